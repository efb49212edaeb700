"""The calibration progress bar follows the Trainer's: off without one, Rich or tqdm as the Trainer draws it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from fora_lightning.trainer_progress import StepBudgetProgressBar, calibration_progress, use_step_budget_bar


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


def test_step_budget_bar_titles_the_epoch_without_a_negative_last_one():
    """With only ``max_steps`` the Trainer's ``max_epochs`` is -1: Lightning's Rich title reads 'Epoch 4/-2'."""
    trainer = _trainer(max_steps=300)
    trainer.fit_loop.max_epochs = -1  # what fit sets for a max_steps budget (Lightning's _parse_loop_limits)
    (plain,) = [c for c in trainer.callbacks if isinstance(c, RichProgressBar)]
    plain.setup(trainer, None, "fit")
    assert trainer.max_epochs == -1 and plain._get_train_description(4).strip() == "Epoch 4/-2"  # what users saw
    use_step_budget_bar(trainer)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, RichProgressBar)]
    assert bar is plain and isinstance(bar, StepBudgetProgressBar)  # the same object, its settings kept
    assert bar._get_train_description(4).strip() == "Epoch 4"
    bounded = _trainer(max_epochs=3, callbacks=[StepBudgetProgressBar()])
    bounded.progress_bar_callback.setup(bounded, None, "fit")
    assert bounded.progress_bar_callback._get_train_description(1).strip() == "Epoch 1/2"  # an epoch bound: kept


def test_step_budget_bar_leaves_a_tqdm_bar_alone():
    trainer = _trainer(max_steps=3, callbacks=[TQDMProgressBar()])
    use_step_budget_bar(trainer)
    assert type(trainer.progress_bar_callback) is TQDMProgressBar
