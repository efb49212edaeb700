r"""L2-SP: fine-tuning pulled back towards the starting point (Li et al. 2018), on the target weights.

.. math:: \mathcal{L} = \mathcal{L}_{task} + \lambda \sum_{\ell} \| W_\ell - W_{0,\ell} \|_F^2

Applied as a gradient term in ``on_before_optimizer_step``: ``grad_W += 2 lambda (W - W0)``, the exact
gradient of the penalty. Why not through the loss: a Callback cannot change the module's loss, the
term needs no autograd graph, and it is added once per optimizer step (not once per accumulated
micro-batch), after AMP unscaling, so ``lambda`` means the same under every precision and
accumulation setting. Any optimizer then sees the penalised gradient (with AdamW the pull is
rescaled elementwise like the task gradient, as in the original method with Adam).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from fora_lightning.baselines.targets_only import TrainTargetsOnly
from fora_lightning.core.targets import DEFAULT_TARGETS, TargetModules


class L2SP(TrainTargetsOnly):
    r"""``lambda ||W - W0||^2`` on every target weight, as the gradient ``2 lambda (W - W0)``.

    ``W0`` is copied (float32) in ``on_train_start`` unless a checkpoint restored it (it is part of
    this callback's state, so a resumed fit pulls towards the original weights). Memory: one float32
    copy of the target weights. The penalty value is logged as ``{state_key}/penalty``.

    Args:
        lambda_: the penalty strength. target_modules: as FORA's (name suffixes or a regex).
        freeze_other: train only the target weights (the same parameters as FORA).
    """

    method_name: ClassVar[str] = "l2sp"

    def __init__(
        self, lambda_: float = 1e-2, target_modules: TargetModules = DEFAULT_TARGETS, freeze_other: bool = True
    ) -> None:
        super().__init__(target_modules, freeze_other)
        if lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)
        self.anchors: dict[str, Tensor] = {}

    @property
    def state_key(self) -> str:
        return type(self).__name__

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.anchors:
            self.anchors = {n: m.weight.detach().float().clone() for n, m in self._targets.items()}
        self.anchors = {n: a.to(self._targets[n].weight.device) for n, a in self.anchors.items()}

    def importance(self, name: str) -> Tensor | float:
        """Per-entry weight of the penalty for layer ``name`` (1 for L2-SP)."""
        return 1.0

    @torch.no_grad()
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """``grad += 2 lambda F (W - W0)`` (``F = 1`` here); logs ``lambda sum F (W - W0)^2``."""
        terms: list[Tensor] = []
        for name, module in self._targets.items():
            w = module.weight
            if not w.requires_grad:
                continue
            diff = w.detach().float() - self.anchors[name]
            weighted = self.importance(name) * diff
            term = (2 * self.lambda_ * weighted).to(w.dtype)
            if w.grad is None:
                w.grad = term
            else:
                w.grad.add_(term)
            terms.append((weighted * diff).sum())
        if terms:
            penalty = self.lambda_ * torch.stack(terms).sum()
            pl_module.log(f"{self.state_key.lower()}/penalty", penalty, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"anchors": {n: a.detach().cpu() for n, a in self.anchors.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchors = {n: a.clone() for n, a in state_dict.get("anchors", {}).items()}
