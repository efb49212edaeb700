"""The FORA Callback: full fine-tuning whose update cannot read what a kept capability reads."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from fora_lightning.calibration import CalibrationSource
from fora_lightning.chain import extend_protection
from fora_lightning.config import ForaConfig
from fora_lightning.core.precision import resolve_precision, split_supported
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.targets import find_targets
from fora_lightning.layerwise_step import LayerwiseStep, check_optimizer
from fora_lightning.protection import Protection
from fora_lightning.safety import companions, refuse_incompatible, refuse_overlap, warn_at_fit_start
from fora_lightning.support import refuse_unsupported_strategy
from fora_lightning.targeting import restore_configure_model, when_targets_exist


class FORA(Callback):
    r"""Function-space orthogonal residual adaptation (FORA, arXiv 2606.31092) for full fine-tuning.

    At the start of fit it runs label-free calibration inputs of the capability to keep through
    the model, estimates for each target linear layer ``y = W x`` the input directions the
    capability occupies (``Q``, top eigenvectors of ``C = (1/N) sum_t x_t x_t^T``) and the weight's
    top singular triplets ``(U_r, S_r, V_r)``. Training then keeps ``W - W0`` in

    .. math:: S = \{ (I - U_r U_r^T) M (I - Q Q^T) + U_r \operatorname{diag}(\delta) V_r^T \}

    by projecting every gradient (``on_before_optimizer_step``) and, with ``mode="update"``,
    re-projecting the weight right after each optimizer step (Adam's scaling and weight decay
    leave ``S``). ``project_gradients=False`` (update-only) keeps only the re-projection: since ``Pi`` is
    linear and ``W - W0`` starts in ``S``, it equals projecting the optimizer's update, at half the flops.
    For inputs in span(Q) the layer's output then changes only through the ``r``-dimensional spectral
    channel; with ``channel_bound = tau`` the re-projection also clamps ``|delta_i| <= tau S_i``, so
    ``||(W - W0) x|| <= tau ||W0 x||`` for every x in span(Q).

    Args:
        calibration: a DataLoader (or a callable returning one) of the capability to keep, or a mapping
            ``name -> DataLoader`` to keep several. ``None``: ``trainer.datamodule.calibration_dataloader()``,
            else ``pl_module.calibration_dataloader()`` (either may return a mapping).
        config: the settings (:class:`~fora_lightning.ForaConfig`; each field documents itself).
        extend_calibration: with ``config.extend_to``, the loader(s) of the task just learned
            (``None``: the datamodule's ``train_dataloader()``, else the trainer's).
        probe: held-out inputs of the kept capability (not used for calibration) for the leakage probe logged
            every ``log_every_n_steps`` (``fora/leakage_max``, ``fora/leakage_mean``) and the end-of-fit
            ``fora_report``; ``None``: ``trainer.datamodule.preserve_val_dataloader()`` when it exists.
        **settings: :class:`~fora_lightning.ForaConfig` fields, applied over ``config``
            (``FORA(calibration=loader, energy=0.95)`` is ``FORA(loader, ForaConfig(energy=0.95))``).

    Example::

        from fora_lightning import FORA
        trainer = Trainer(callbacks=[FORA(calibration=keep_loader, target_modules=["q_proj", "up_proj"])])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        calibration: CalibrationSource = None,
        config: ForaConfig | None = None,
        extend_calibration: CalibrationSource = None,
        probe: CalibrationSource = None,
        **settings: Any,
    ) -> None:
        self.config = ForaConfig.resolve(config, settings)
        self.config.refuse_unused("FORA")  # e.g. lora_rank: FORA-LoRA's, not read here
        if self.config.channel_bound is not None and self.config.mode != "update" and self.config.weight_rank > 0:
            warnings.warn(
                f"FORA: channel_bound={self.config.channel_bound:g} is not enforced in mode={self.config.mode!r} (the bound is "
                "kept by the post-step re-projection, which only mode='update' runs): the spectral channel is unbounded. "
                "Use mode='update' for the certified bound, or channel_bound=None (or weight_rank=0) to silence this",
                stacklevel=2,
            )
        self.extend_calibration = extend_calibration
        update = self.config.mode == "update"
        self.protection = Protection(
            self.config, calibration, reprojects=update, who="FORA", bounds_channel=update, shardable=True
        )
        self.protection.monitor.source = probe
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._steps: list[LayerwiseStep] = []  # reprojection='step': each optimizer's step taken layer by layer
        self._project_grads: Callable[[Mapping[str, LayerSubspace]], None] | None = None  # resolved at train start
        self._reproject: Callable[[Mapping[str, LayerSubspace]], None] | None = None  # reprojection='anchors' only
        self.precision = "float32"  # resolved from config.precision at fit start (core.precision.resolve_precision)
        self._split = False

    @property
    def calibration(self) -> CalibrationSource:
        """The calibration source; assigning a new one before another ``fit`` re-estimates the bases there."""
        return self.protection.calibration

    @calibration.setter
    def calibration(self, value: CalibrationSource) -> None:
        self.protection.calibration = value

    @property
    def subspaces(self) -> dict[str, LayerSubspace]:
        """Layer name -> its :class:`~fora_lightning.core.subspace.LayerSubspace` (empty before fit)."""
        return self.protection.subspaces

    @subspaces.setter
    def subspaces(self, value: Mapping[str, LayerSubspace]) -> None:
        self.protection.subspaces = dict(value)

    @property
    def capabilities(self) -> dict[str, dict[str, Any]]:
        """Capability name -> its calibration token count, weight, data fingerprint and chain step."""
        return self.protection.capabilities

    @property
    def capability_energy(self) -> dict[str, dict[str, float]]:
        """Layer -> capability -> ``tr(Q^T C_c Q) / tr(C_c)``, the share of each capability's energy kept."""
        return self.protection.capability_energy

    @property
    def chain(self) -> list[dict[str, Any]]:
        """The fine-tunes these subspaces protect, in order (``FORA.extend`` appends)."""
        return self.protection.chain

    @property
    @override
    def state_key(self) -> str:
        """``FORA{'target_modules': [...]}``: two instances on different layers checkpoint side by side."""
        return self._generate_state_key(target_modules=self.config.target_modules)

    @property
    def _legacy_state_key(self) -> str:  # Lightning's fallback lookup: checkpoints saved under the bare name
        return "FORA"

    # ------------------------------------------------------------------ fit lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the targets and freeze the rest, before the strategy wraps the model."""
        if stage != "fit":
            return
        refuse_unsupported_strategy(trainer, "FORA")
        when_targets_exist(pl_module, self.config.target_modules, lambda: self._select(trainer, pl_module))

    def _select(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Select this callback's targets, leaving those of other FORA callbacks (disjoint layers) trainable."""
        others = companions(trainer, self)
        refuse_incompatible(self, others)
        theirs = {n: m for cb in others for n, m in find_targets(pl_module, cb.config.target_modules).items()}
        refuse_overlap(find_targets(pl_module, self.config.target_modules), theirs)
        self.protection.select(pl_module, keep=theirs.values())

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the targets again (FSDP1 keeps the Linear objects) and check the fit's settings."""
        self._remove_hooks()
        self.protection.find(pl_module)
        warn_at_fit_start(trainer, pl_module, self.config, self.protection.targets, "FORA")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Estimate (or load) the subspaces before the first step, unless a checkpoint restored them; then install the
        post-step projection on every optimizer: each layer's step projected (``reprojection='step'``) or the weights
        re-projected from anchors after the whole step (``'anchors'``)."""
        self.protection.prepare(trainer, pl_module)
        self.protection.summarize(trainer, pl_module, step_work(self.config, self.protection))
        flat = bool(self.protection.layout is not None and self.protection.layout.flat)
        self.precision = resolve_precision(self.config.precision, pl_module.device, self.config.mode, flat=flat)
        self._split = split_supported(self.precision, pl_module.device)
        layout, bound = self.protection.layout, self.config.channel_bound
        self._project_grads = layout.gradient_projector(self.precision)  # the per-step path, chosen once per fit
        self._reproject = layout.reprojector(self.precision, self._split, bound) if self.protection.anchors else None
        self.protection.monitor.start(trainer, pl_module, self.protection.targets, self.subspaces)
        self._install(trainer)

    def _install(self, trainer: Trainer) -> None:
        self._remove_hooks()
        if self.config.mode != "update":
            return
        if self.protection.anchors:
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            return
        bound = self.config.channel_bound
        for optimizer in trainer.optimizers:
            check_optimizer(optimizer)
            units, done = self.protection.layout.step_units(self.subspaces, bound)
            self._steps.append(LayerwiseStep(optimizer, units, done).install())

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``fora/leakage_max``, ``fora/leakage_mean`` (and per layer, less often) to every logger (:mod:`~fora_lightning.monitor`)."""
        self.protection.monitor.step(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fora_report.json`` and ``fora_report.md`` in ``trainer.log_dir``."""
        self.protection.monitor.finish(trainer, pl_module, self.subspaces)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """``grad <- Pi(grad)`` for every target weight (local rows + one ``r x d_in`` all-reduce under FSDP2;
        one FSDP1 unit gathered at a time); skipped with ``project_gradients=False`` (update-only)."""
        if self.config.project_gradients and self._project_grads is not None:
            self._project_grads(self.subspaces)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``W <- W0 + Pi(W - W0)`` from the anchors (fires only for steps the optimizer really took)."""
        if self._reproject is not None:
            self._reproject(self.subspaces)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``extend_to``: :meth:`extend` with ``extend_calibration`` and write the merged file there."""
        if self.config.extend_to is not None:
            self.extend(trainer, pl_module, self.extend_calibration, self.config.extend_to)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        if stage == "fit":
            self.protection.finish()
        restore_configure_model(pl_module)

    # ------------------------------------------------------------------ the bases
    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces."""
        return self.protection.estimate(trainer, pl_module)

    def extend(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        calibration: CalibrationSource = None,
        path: str | Path | None = None,
    ) -> dict[str, LayerSubspace]:
        """Chained fine-tunes: add the task just learned to the protected subspaces, GPM-style.

        Its covariances are measured through the *tuned* model (``calibration``: a loader or
        ``name -> loader``; ``None``: the task's training data), and each layer's Q grows by the
        top residual directions ``(I - QQ^T) C (I - QQ^T)`` until ``energy`` of ``C`` is held (capped
        by ``max_rank``); ``U_r, S_r, V_r`` and the anchors come from the tuned weights, the next run's W0.
        Writes the merged file to ``path`` (rank 0) when given and keeps the result for a next ``fit``.
        """
        return extend_protection(self.protection, trainer, pl_module, calibration, path)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Bases, anchors (gathered full-size under FSDP2), capabilities, chain and the settings."""
        return self.protection.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.protection.load_state_dict(state_dict)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for s in self._steps:
            s.remove()
        self._steps.clear()


def step_work(config: ForaConfig, protection: Protection | None = None) -> str:
    """The summary's line on FORA's per-step work under ``config`` (mode, project_gradients, reprojection)."""
    if config.mode == "gradient":
        return "per step: grad <- Pi(grad) before the optimizer step (mode='gradient', no re-projection)"
    anchors = protection is not None and protection.anchors
    after = (
        "W <- W0 + Pi(W - W0) from anchors W0 Q after the optimizer step (reprojection='anchors')"
        if anchors
        else "the optimizer steps one layer at a time and each layer's step is projected, W <- W_before + Pi(step) "
        "(reprojection='step': no anchors)"
    )
    if not config.project_gradients:
        return (
            f"per step: {after}; no gradient projection (update-only, project_gradients=False; "
            "it wants about twice the lr of update mode: docs/experiments.md)"
        )
    return f"per step: grad <- Pi(grad) before the optimizer step, and {after}"
