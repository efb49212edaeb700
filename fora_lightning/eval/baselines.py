"""Shared glue of the baseline Callbacks: train only the target weights, find calibration data.

:class:`TrainTargetsOnly` is the plain fine-tuning baseline at FORA's parameter set: the same
target weights train, everything else is frozen, and nothing constrains the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from fora_lightning.callback import DEFAULT_TARGETS
from fora_lightning.core.targets import TargetModules, find_targets

CalibrationSource = Iterable[Any] | Callable[[], Iterable[Any]] | None


class TrainTargetsOnly(Callback):
    """Plain fine-tuning of the ``target_modules`` weights only (with ``freeze_other``, all else frozen).

    Freezing happens in ``setup`` (before the strategy wraps the model), as in :class:`~fora_lightning.FORA`,
    so a comparison trains exactly the same parameters under every full-fine-tuning method.
    """

    def __init__(self, target_modules: TargetModules = DEFAULT_TARGETS, freeze_other: bool = True) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.freeze_other = freeze_other
        self._targets: dict[str, nn.Linear] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._targets = find_targets(pl_module, self.target_modules)
        if self.freeze_other:
            keep = {id(m.weight) for m in self._targets.values()}
            frozen = 0
            for p in pl_module.parameters():
                if id(p) not in keep and p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
            trained = sum(m.weight.numel() for m in self._targets.values())
            rank_zero_info(f"{type(self).__name__}: training {len(self._targets)} target weights ({trained:,} parameters); froze {frozen:,}")


def calibration_loader(calibration: CalibrationSource, trainer: Trainer, pl_module: LightningModule) -> Iterable[Any]:
    """``calibration`` (called if it is a factory), else ``trainer.datamodule.calibration_dataloader()``,
    else ``pl_module.calibration_dataloader()`` (the same search order as the FORA Callback)."""
    if calibration is not None:
        return calibration() if callable(calibration) and not hasattr(calibration, "__iter__") else calibration
    for owner in (trainer.datamodule, pl_module):
        fn = getattr(owner, "calibration_dataloader", None)
        if callable(fn):
            return fn()
    raise ValueError(
        "no calibration data: pass calibration=<DataLoader of the capability to keep>, or define "
        "calibration_dataloader() on the datamodule or the LightningModule"
    )
