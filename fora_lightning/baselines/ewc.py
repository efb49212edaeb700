r"""EWC: L2-SP weighted by the diagonal Fisher information of the kept capability (Kirkpatrick et al. 2017).

.. math:: \mathcal{L} = \mathcal{L}_{task} + \lambda \sum_i \tilde F_i (\theta_i - \theta_{0,i})^2,
          \qquad \tilde F = F / \operatorname{mean}(F)

Label-free Fisher from the calibration data (the same loader FORA calibrates on; only
``input_ids``/``attention_mask`` are read). For each calibration sequence ``s`` with next-token
positions ``T_s`` (``attention_mask[t + 1] = 1``)

.. math:: F = \frac{1}{S} \sum_s \Big( \nabla_\theta \frac{1}{|T_s|} \sum_{t \in T_s} \log p_\theta(y_{s,t} \mid x_{s, \le t}) \Big)^2

with ``y`` sampled from the model's own next-token distribution (``fisher="sampled"``: a one-sample
Monte Carlo estimate of the true Fisher, needs no labels) or the text's own next tokens
(``fisher="empirical"``: the empirical Fisher of the LM loss on calibration text). One gradient per
sequence (squares of a batch-mean gradient would underestimate F). ``F`` is normalised to mean 1 over
all target entries, so ``lambda`` has the scale of L2-SP's: EWC is L2-SP with per-entry weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm
from typing_extensions import override

from fora_lightning.baselines.l2sp import L2SP
from fora_lightning.calibration import CalibrationSource, resolve_calibration
from fora_lightning.core.covariance import eval_mode
from fora_lightning.core.targets import DEFAULT_TARGETS, TargetModules

FisherKind = Literal["sampled", "empirical"]


class EWC(L2SP):
    """Diagonal-Fisher-weighted pull towards ``W0`` on the target weights: ``grad += 2 lambda F~ (W - W0)``.

    The Fisher is estimated in ``on_train_start`` (before the first step; restored from a checkpoint
    when resuming) by a forward and backward per calibration sequence through ``pl_module``
    (``calibration_step(batch)`` if defined, else ``pl_module(input_ids=..., attention_mask=...)``,
    whose output is logits or has ``.logits``). Under DDP each rank takes every world_size-th batch
    and the sums are all-reduced. Not for FSDP (needs whole weights and gradients).

    Args:
        calibration: loader (or factory) of the capability to keep; ``None``: the datamodule's or module's
            ``calibration_dataloader()``.
        lambda_, target_modules, freeze_other: as :class:`L2SP`.
        fisher: ``"sampled"`` (model's own predictions) or ``"empirical"`` (the text's next tokens).
        seed: for the sampled labels. progress: a progress bar over calibration batches (rank 0).
    """

    method_name: ClassVar[str] = "ewc"

    def __init__(
        self,
        calibration: CalibrationSource = None,
        lambda_: float = 1e-2,
        target_modules: TargetModules = DEFAULT_TARGETS,
        fisher: FisherKind = "sampled",
        freeze_other: bool = True,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(lambda_, target_modules, freeze_other)
        if fisher not in ("sampled", "empirical"):
            raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}")
        self.calibration = calibration
        self.fisher_kind: FisherKind = fisher
        self.seed = seed
        self.progress = progress
        self.fisher: dict[str, Tensor] = {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.fisher:
            self.fisher = self.estimate_fisher(trainer, pl_module)
        self.fisher = {n: f.to(self._targets[n].weight.device) for n, f in self.fisher.items()}

    def importance(self, name: str) -> Tensor:
        return self.fisher[name]

    def estimate_fisher(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """``F~``: mean squared per-sequence gradients of the mean log-likelihood, normalised to mean 1."""
        weights = {n: m.weight for n, m in self._targets.items()}
        sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        count = torch.zeros((), dtype=torch.float64, device=next(iter(weights.values())).device)
        gen = torch.Generator(device=count.device).manual_seed(self.seed + trainer.global_rank)
        loader = resolve_calibration(self.calibration, trainer, pl_module)
        batches = (b for i, b in enumerate(loader) if i % trainer.world_size == trainer.global_rank)
        bar = tqdm(batches, desc="EWC Fisher", disable=not (self.progress and trainer.is_global_zero), leave=False)
        with eval_mode(pl_module), torch.enable_grad():
            for batch in bar:
                batch = trainer.strategy.batch_to_device(batch)
                for row in _rows(batch):
                    ll = self._sequence_log_likelihood(pl_module, row, gen)
                    if ll is None:
                        continue
                    grads = torch.autograd.grad(ll, list(weights.values()), allow_unused=True)
                    for n, g in zip(weights, grads):
                        if g is not None:
                            sums[n] += g.float().square()
                    count += 1
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            for s in sums.values():
                torch.distributed.all_reduce(s)
            torch.distributed.all_reduce(count)
        if count.item() == 0:
            raise ValueError("EWC: the calibration data holds no sequence with two or more tokens")
        mean = sum(float(s.sum()) for s in sums.values()) / (sum(s.numel() for s in sums.values()) * count.item())
        scale = 1.0 / (count.item() * max(mean, 1e-30))
        rank_zero_info(
            f"EWC: {self.fisher_kind} Fisher from {int(count.item())} calibration sequences (mean {mean:.3e}, normalised to 1)"
        )
        return {n: s * scale for n, s in sums.items()}

    def _sequence_log_likelihood(
        self, pl_module: LightningModule, row: Mapping[str, Tensor], gen: torch.Generator
    ) -> Tensor | None:
        """``(1/|T|) sum_{t in T} log p(y_t | x_{<=t})`` for one sequence, or None if it has no next-token position."""
        ids, mask = row["input_ids"], row.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        positions = mask[0, 1:] != 0
        if not positions.any():
            return None
        log_probs = (
            _logits(pl_module, {"input_ids": ids, "attention_mask": mask})[0, :-1][positions].float().log_softmax(-1)
        )
        if self.fisher_kind == "sampled":
            labels = torch.multinomial(log_probs.detach().exp(), 1, generator=gen).squeeze(1)
        else:
            labels = ids[0, 1:][positions]
        return log_probs.gather(1, labels[:, None]).mean()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fisher": {n: f.detach().cpu() for n, f in self.fisher.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.fisher = {n: f.clone() for n, f in state_dict.get("fisher", {}).items()}


def _rows(batch: Mapping[str, Any]) -> list[dict[str, Tensor]]:
    """One ``{input_ids, attention_mask}`` dict of shape ``1 x T`` per sequence of a mapping batch."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("EWC: calibration batches must be mappings with 'input_ids' (and 'attention_mask')")
    keys = [k for k in ("input_ids", "attention_mask") if k in batch]
    return [{k: batch[k][i : i + 1] for k in keys} for i in range(batch["input_ids"].shape[0])]


def _logits(pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor:
    step = getattr(pl_module, "calibration_step", None)
    out = step(batch) if callable(step) else pl_module(**batch)
    return out.logits if hasattr(out, "logits") else out
