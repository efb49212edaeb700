"""The FORA Callback: full fine-tuning whose update cannot read what a kept capability reads."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from fora_lightning.calibration import CalibrationSource
from fora_lightning.config import ForaConfig
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.protection import Protection
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
    leave ``S``). For inputs in span(Q) the layer's output then changes only through the
    ``r``-dimensional spectral channel; with ``channel_bound = tau`` the re-projection also clamps
    ``|delta_i| <= tau S_i``, so ``||(W - W0) x|| <= tau ||W0 x||`` for every x in span(Q).

    Args:
        calibration: a DataLoader (or a callable returning one) of the capability to keep, or a mapping
            ``name -> DataLoader`` to keep several. ``None``: ``trainer.datamodule.calibration_dataloader()``,
            else ``pl_module.calibration_dataloader()`` (either may return a mapping).
        config: the settings (:class:`~fora_lightning.ForaConfig`; each field documents itself).
        extend_calibration: with ``config.extend_to``, the loader(s) of the task just learned
            (``None``: the datamodule's ``train_dataloader()``, else the trainer's).
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
        **settings: Any,
    ) -> None:
        self.config = ForaConfig.resolve(config, settings)
        if self.config.channel_bound is not None and self.config.mode != "update" and self.config.weight_rank > 0:
            warnings.warn(
                f"FORA: channel_bound={self.config.channel_bound:g} is not enforced in mode={self.config.mode!r} (the bound is "
                "kept by the post-step re-projection, which only mode='update' runs): the spectral channel is unbounded. "
                "Use mode='update' for the certified bound, or channel_bound=None (or weight_rank=0) to silence this",
                stacklevel=2,
            )
        self.calibration = calibration
        self.extend_calibration = extend_calibration
        self.protection = self._protection()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def _protection(self) -> Protection:
        update = self.config.mode == "update"
        return Protection(self.config, self.calibration, anchors=update, who="FORA", bounds_channel=update)

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
        return "FORA"

    # ------------------------------------------------------------------ fit lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the targets and freeze the rest, before the strategy wraps the model."""
        if stage != "fit":
            return
        when_targets_exist(pl_module, self.config.target_modules, lambda: self.protection.select(pl_module))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Register the post-step re-projection on every optimizer (once per fit)."""
        self._remove_hooks()
        self.protection.find(pl_module)  # FSDP1 keeps the Linear objects
        if self.config.mode == "update":
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Estimate (or load) the subspaces before the first step, unless a checkpoint restored them."""
        self.protection.prepare(trainer, pl_module)
        self.protection.summarize(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """``grad <- Pi(grad)`` for every target weight (local rows + one ``r x d_in`` all-reduce under FSDP2;
        one FSDP1 unit gathered at a time)."""
        self.protection.layout.project_grads(self.subspaces)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``W <- W0 + Pi(W - W0)`` from the anchors (fires only for steps the optimizer really took)."""
        if self.protection.layout is not None:
            self.protection.layout.reproject(self.subspaces, self.config.channel_bound)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``extend_to``: :meth:`extend` with ``extend_calibration`` and write the merged file there."""
        if self.config.extend_to is not None:
            self.extend(trainer, pl_module, self.extend_calibration, self.config.extend_to)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        restore_configure_model(pl_module)

    # ------------------------------------------------------------------ the bases
    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces."""
        return self.protection.estimate(trainer, pl_module)

    def extend(
        self, trainer: Trainer, pl_module: LightningModule, calibration: CalibrationSource = None, path: str | Path | None = None
    ) -> dict[str, LayerSubspace]:
        """Chained fine-tunes: add the task just learned to the protected subspaces, GPM-style.

        Its covariances are measured through the *tuned* model (``calibration``: a loader or
        ``name -> loader``; ``None``: the task's training data), and each layer's Q grows by the
        top residual directions ``(I - QQ^T) C (I - QQ^T)`` until ``energy`` of ``C`` is held (capped
        by ``max_rank``); ``U_r, S_r, V_r`` and the anchors come from the tuned weights, the next run's W0.
        Writes the merged file to ``path`` (rank 0) when given and keeps the result for a next ``fit``.
        """
        return self.protection.extend(trainer, pl_module, calibration, path)

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
