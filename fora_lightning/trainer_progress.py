"""The calibration progress bar, following the Trainer's: none without a progress bar callback
(``enable_progress_bar=False``) or when it is disabled (ranks other than 0, ``refresh_rate=0``); a Rich bar
in the :class:`~lightning.pytorch.callbacks.RichProgressBar`'s theme; else Lightning's tqdm, styled as the
:class:`~lightning.pytorch.callbacks.TQDMProgressBar` draws it. Transient: it is gone when calibration ends.

:class:`StepBudgetProgressBar`: Lightning's Rich bar, titled ``Epoch 4`` rather than ``Epoch 4/-2`` when only
``max_steps`` bounds the fit (``cli.py`` puts it in place of the Trainer's default Rich bar)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from typing_extensions import override

from fora_lightning.core.covariance import Progress


def _total(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def calibration_progress(
    trainer: Trainer, enabled: bool = True, description: str = "FORA calibration"
) -> Progress | None:
    """A :data:`~fora_lightning.core.covariance.Progress` in the style of ``trainer.progress_bar_callback``, or ``None``."""
    bar = trainer.progress_bar_callback
    if not enabled or bar is None or bar.is_disabled or not trainer.is_global_zero:
        return None
    if isinstance(bar, RichProgressBar):
        return _rich(bar, description)
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    bar_format = bar.BAR_FORMAT if isinstance(bar, TQDMProgressBar) else None

    def wrap(batches: Iterable[Any]) -> Iterable[Any]:
        return Tqdm(
            batches,
            total=_total(batches),
            desc=description,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=bar_format,
        )

    return wrap


class StepBudgetProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` whose title shows no last epoch when there is none.

    With ``max_steps`` and no ``max_epochs`` the Trainer sets ``max_epochs = -1`` (no epoch bound) and Lightning's
    Rich bar titles the fit ``Epoch {n}/{max_epochs - 1}`` = ``Epoch 4/-2``; this bar titles it ``Epoch 4``.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        # Checked: lightning 2.6.6, RichProgressBar._get_train_description (the title of the training bar).
        # Public replacement: none (the title is not configurable).
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = f"{description.replace(f'/{self.trainer.max_epochs - 1}', '', 1).rstrip():{len(description)}}"
        return description


def use_step_budget_bar(trainer: Trainer) -> None:
    """Make the Trainer's plain :class:`~lightning.pytorch.callbacks.RichProgressBar` a :class:`StepBudgetProgressBar`.

    The same object, its settings kept: the subclass only overrides the title (a subclass of Lightning's bar, or a
    tqdm bar, is left alone).
    """
    for callback in trainer.callbacks:
        if type(callback) is RichProgressBar:
            callback.__class__ = StepBudgetProgressBar


def _rich(bar: RichProgressBar, description: str) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    theme = bar.theme

    def wrap(batches: Iterable[Any]) -> Iterator[Any]:
        columns = (
            TextColumn("[progress.description]{task.description}", style=theme.description),
            BarColumn(complete_style=theme.progress_bar, finished_style=theme.progress_bar_finished),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, transient=True) as progress:
            task = progress.add_task(description, total=_total(batches))
            for batch in batches:
                yield batch
                progress.advance(task)

    return wrap
