"""The calibration progress bar follows the Trainer's: off without one, Rich or tqdm as the Trainer draws it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from fora_lightning.trainer_progress import calibration_progress


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False, **kwargs)


def test_no_bar_when_the_trainer_has_none_or_it_is_disabled():
    assert calibration_progress(_trainer(enable_progress_bar=False)) is None
    assert calibration_progress(_trainer(callbacks=[TQDMProgressBar(refresh_rate=0)])) is None
    assert calibration_progress(_trainer(), enabled=False) is None  # ForaConfig(progress=False)


@pytest.mark.parametrize("bar", [TQDMProgressBar(), RichProgressBar()], ids=["tqdm", "rich"])
def test_bar_of_the_trainers_kind_yields_every_batch(bar, capsys):
    wrap = calibration_progress(_trainer(callbacks=[bar]))
    assert wrap is not None
    batches = [object() for _ in range(5)]
    wrapped = wrap(batches)
    if isinstance(bar, TQDMProgressBar):
        assert isinstance(wrapped, Tqdm) and wrapped.total == 5
    assert [id(b) for b in wrapped] == [id(b) for b in batches]
