"""The FORA Callback: full fine-tuning whose update cannot read what a kept capability reads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from fora_lightning.core.covariance import Covariances, collect_covariances
from fora_lightning.core.projection import project, project_weight_
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, estimate_subspaces, format_summary
from fora_lightning.core.subspace_file import load_subspaces, save_subspaces, validate_against
from fora_lightning.core.targets import TargetModules, find_targets

log = logging.getLogger(__name__)

Mode = Literal["update", "gradient"]
CalibrationSource = Iterable[Any] | Callable[[], Iterable[Any]] | None

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FORA(Callback):
    r"""Function-space orthogonal residual adaptation (FORA, arXiv 2606.31092) for full fine-tuning.

    At the start of fit it runs label-free calibration inputs of the capability to keep through
    the model, estimates for each target linear layer ``y = W x`` the input directions the
    capability occupies (``Q``, top eigenvectors of ``C = (1/N) sum_t x_t x_t^T``) and the weight's
    top singular triplets ``(U_r, S_r, V_r)``. Training then keeps ``W - W0`` in

    .. math:: S = \{ (I - U_r U_r^T) M (I - Q Q^T) + U_r \operatorname{diag}(\delta) V_r^T \}

    by projecting every gradient (``on_before_optimizer_step``) and, with ``mode="update"``,
    re-projecting the weight right after each optimizer step (Adam's scaling and weight decay
    leave ``S``). For inputs in span(Q) the layer's output then changes only through the
    ``r``-dimensional spectral channel.

    Args:
        calibration: a DataLoader (or a callable returning one) of the capability to keep. ``None``:
            ``trainer.datamodule.calibration_dataloader()``, else ``pl_module.calibration_dataloader()``.
        target_modules: module-name suffixes matched on ``.`` boundaries, or one regex string.
        energy: keep the smallest k whose eigenvalues hold this fraction of the trace.
        rank: a fixed k (int, or per-layer mapping) instead of ``energy``. max_rank: cap on k.
        weight_rank: r, top singular triplets of W0 protected (0 turns off left projector and channel).
        source: ``"activations"`` (FORA), ``"weights"`` (weight-space baseline), ``"random"`` (control).
        mode: ``"update"`` (project gradients and re-project weights) or ``"gradient"`` (gradients only).
        freeze_other: freeze every parameter that is not a target weight (biases, norms, embeddings).
        subspaces: a file to load bases from when it exists, else to save the estimated ones to.
        covariance_dtype: ``"float32"`` or ``"float64"`` accumulators.
        progress: show a progress bar during calibration (rank 0).

    Example::

        from fora_lightning import FORA
        trainer = Trainer(callbacks=[FORA(calibration=keep_loader, target_modules=["q_proj", "up_proj"])])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        calibration: CalibrationSource = None,
        target_modules: TargetModules = DEFAULT_TARGETS,
        energy: float = 0.99,
        rank: int | Mapping[str, int] | None = None,
        max_rank: int | None = None,
        weight_rank: int = 8,
        source: Literal["activations", "weights", "random"] = "activations",
        mode: Mode = "update",
        freeze_other: bool = True,
        subspaces: str | Path | None = None,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if mode not in ("update", "gradient"):
            raise ValueError(f"mode must be 'update' or 'gradient', got {mode!r}")
        if covariance_dtype not in _DTYPES:
            raise ValueError(f"covariance_dtype must be 'float32' or 'float64', got {covariance_dtype!r}")
        self.calibration = calibration
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.config = SubspaceConfig(energy=energy, rank=rank, max_rank=max_rank, weight_rank=weight_rank, source=source, seed=seed)
        self.mode: Mode = mode
        self.freeze_other = freeze_other
        self.subspaces_path = Path(subspaces) if subspaces is not None else None
        self.covariance_dtype = _DTYPES[covariance_dtype]
        self.progress = progress
        self.subspaces: dict[str, LayerSubspace] = {}
        self._targets: dict[str, nn.Linear] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def state_key(self) -> str:
        return "FORA"

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the targets and freeze the rest, before the strategy wraps the model."""
        if stage != "fit":
            return
        self._targets = find_targets(pl_module, self.target_modules)
        if self.freeze_other:
            self._freeze_non_targets(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Register the post-step re-projection on every optimizer (once per fit)."""
        self._remove_hooks()
        self._targets = find_targets(pl_module, self.target_modules)
        if self.mode == "update":
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Estimate (or load) the subspaces before the first step, unless a checkpoint restored them."""
        if self.subspaces:
            validate_against(self.subspaces, self._targets, "the checkpoint")
            self._to_device(pl_module.device)
            rank_zero_info(f"FORA: {len(self.subspaces)} layer subspaces restored from the checkpoint")
            return
        if self.subspaces_path is not None and self.subspaces_path.is_file():
            self.subspaces, _ = load_subspaces(self.subspaces_path)
            validate_against(self.subspaces, self._targets, str(self.subspaces_path))
            if self.mode == "update" and any(s.complement for s in self.subspaces.values()):
                raise ValueError(
                    f"{self.subspaces_path} stores complement bases (gradient-mode); mode='update' needs Q itself: "
                    "re-estimate with mode='update'"
                )
            rank_zero_info(f"FORA: loaded {len(self.subspaces)} layer subspaces from {self.subspaces_path}")
        else:
            self.subspaces = self.estimate(trainer, pl_module)
            if self.subspaces_path is not None and trainer.is_global_zero:
                save_subspaces(self.subspaces_path, self.subspaces, {"config": self._config_dict()})
                rank_zero_info(f"FORA: subspaces saved to {self.subspaces_path}")
        self._to_device(pl_module.device)
        if self.mode == "update":
            for name, sub in self.subspaces.items():
                sub.attach_anchors(self._targets[name].weight)
        param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        rank_zero_info("FORA protected subspaces\n" + format_summary(self.subspaces, param_bytes))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"fora/k/{n}": float(s.k) for n, s in self.subspaces.items()}, step=0)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """``grad <- Pi(grad)`` for every target weight."""
        for name, module in self._targets.items():
            grad = module.weight.grad
            if grad is None:
                continue
            sub = self.subspaces[name]
            grad.copy_(project(grad, sub.basis, sub.u, sub.v, complement=sub.complement))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ estimation
    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces."""
        covariances = self.calibrate(trainer, pl_module) if self.config.source == "activations" else None
        weights = {n: m.weight.detach() for n, m in self._targets.items()}
        return estimate_subspaces(weights, self.config, covariances, allow_complement=self.mode == "gradient")

    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> Covariances:
        """Covariances of every target's input over this rank's share of the calibration batches, summed over ranks."""
        loader = self._calibration_loader(trainer, pl_module)
        forward = _calibration_forward(pl_module)

        def step(batch: Any) -> None:
            with trainer.precision_plugin.forward_context():
                forward(trainer.strategy.batch_to_device(batch))

        covariances = collect_covariances(
            pl_module,
            self._targets,
            _shard(loader, trainer.global_rank, trainer.world_size),
            step,
            dtype=self.covariance_dtype,
            progress=self.progress and trainer.is_global_zero,
        )
        if trainer.world_size > 1:
            covariances.all_reduce_()
        return covariances

    def _calibration_loader(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[Any]:
        if self.calibration is not None:
            return self.calibration() if callable(self.calibration) and not hasattr(self.calibration, "__iter__") else self.calibration
        for owner, label in ((trainer.datamodule, "trainer.datamodule"), (pl_module, type(pl_module).__name__)):
            fn = getattr(owner, "calibration_dataloader", None)
            if callable(fn):
                return fn()
        raise ValueError(
            "FORA found no calibration data. It looked at FORA(calibration=...) (None), "
            f"trainer.datamodule.calibration_dataloader() ({'no datamodule' if trainer.datamodule is None else 'not defined'}) "
            f"and {type(pl_module).__name__}.calibration_dataloader() (not defined). Pass a DataLoader of the capability to keep"
        )

    # ------------------------------------------------------------------ step hooks
    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``W <- W0 + Pi(W - W0)`` from the anchors (fires only for steps the optimizer really took)."""
        for name, module in self._targets.items():
            sub = self.subspaces.get(name)
            if sub is None or sub.anchor_q is None:
                continue
            project_weight_(module.weight.data, sub.basis, sub.anchor_q, sub.u, sub.v, sub.anchor_u)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "config": self._config_dict(),
            "layers": {
                name: {
                    "meta": {"d_out": s.d_out, "d_in": s.d_in, "k": s.k, "complement": s.complement, "energy": s.energy},
                    "tensors": {k: t.detach().cpu() for k, t in s.tensors().items()},
                }
                for name, s in self.subspaces.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.subspaces = {
            name: LayerSubspace(**entry["meta"], **{k: t.clone() for k, t in entry["tensors"].items()})
            for name, entry in state_dict.get("layers", {}).items()
        }

    # ------------------------------------------------------------------ helpers
    def _config_dict(self) -> dict[str, Any]:
        c = self.config
        rank = dict(c.rank) if isinstance(c.rank, Mapping) else c.rank
        return {
            "target_modules": self.target_modules, "energy": c.energy, "rank": rank, "max_rank": c.max_rank,
            "weight_rank": c.weight_rank, "source": c.source, "mode": self.mode, "seed": c.seed,
        }

    def _freeze_non_targets(self, pl_module: LightningModule) -> None:
        target_ids = {id(m.weight) for m in self._targets.values()}
        frozen = kept = 0
        frozen_numel = kept_numel = 0
        for p in pl_module.parameters():
            if id(p) in target_ids:
                kept += 1
                kept_numel += p.numel()
                if not p.requires_grad:
                    rank_zero_warn("FORA: a target weight has requires_grad=False; it will not train")
            elif p.requires_grad:
                p.requires_grad_(False)
                frozen += 1
                frozen_numel += p.numel()
        rank_zero_info(
            f"FORA: training {kept} target weights ({kept_numel:,} parameters); froze {frozen} other parameter tensors "
            f"({frozen_numel:,} parameters: biases, norms, embeddings, ...). Set freeze_other=False to train them unprotected."
        )

    def _to_device(self, device: torch.device) -> None:
        for sub in self.subspaces.values():
            sub.to(device)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _calibration_forward(pl_module: LightningModule) -> Callable[[Any], Any]:
    """``calibration_step(batch)`` if the module defines it, else ``module(**batch)`` / ``(*batch)`` / ``(batch)``."""
    step = getattr(pl_module, "calibration_step", None)
    if callable(step):
        return step

    def forward(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return pl_module(**batch)
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, torch.Tensor)):
            return pl_module(*batch)
        return pl_module(batch)

    return forward


def _shard(batches: Iterable[Any], rank: int, world_size: int) -> Iterable[Any]:
    """Every ``world_size``-th batch starting at ``rank`` (all batches on one process)."""
    if world_size == 1:
        return batches
    return _Strided(batches, rank, world_size)


class _Strided:
    def __init__(self, batches: Iterable[Any], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i % self.world_size == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.batches)  # type: ignore[arg-type]
        return (n - self.rank + self.world_size - 1) // self.world_size
