"""Shared glue of the baseline Callbacks: train only the target weights.

:class:`TrainTargetsOnly` is the plain fine-tuning baseline at FORA's parameter set: the same
target weights train, everything else is frozen, and nothing constrains the update.
"""

from __future__ import annotations

from typing import ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from fora_lightning.core.targets import DEFAULT_TARGETS, TargetModules
from fora_lightning.targeting import restore_configure_model, select_targets, when_targets_exist


class TrainTargetsOnly(Callback):
    """Plain fine-tuning of the ``target_modules`` weights only (with ``freeze_other``, all else frozen).

    Freezing happens in ``setup`` (before the strategy wraps the model), as in :class:`~fora_lightning.FORA`,
    so a comparison trains exactly the same parameters under every full-fine-tuning method.
    """

    method_name: ClassVar[str] = "plain_ft"  # how reports name the fit (fora_lightning.llm.report.method_of)

    def __init__(self, target_modules: TargetModules = DEFAULT_TARGETS, freeze_other: bool = True) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.freeze_other = freeze_other
        self._targets: dict[str, nn.Linear] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        when_targets_exist(pl_module, self.target_modules, lambda: self._select_targets(pl_module))

    def _select_targets(self, pl_module: LightningModule) -> None:
        self._targets = select_targets(pl_module, self.target_modules, self.freeze_other, type(self).__name__)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        restore_configure_model(pl_module)
