"""The ForaLoRA Callback: FORA's calibration, with the update parametrised as a projected LoRA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from fora_lightning.calibration import CalibrationSource
from fora_lightning.config import LORA_STRUCTURE, ForaConfig
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.lora.model import fora_lora_layers, inject_fora_lora, mark_only_lora_trainable, trainable_parameters
from fora_lightning.lora.resume import presize_before_load
from fora_lightning.protection import Protection
from fora_lightning.safety import companions, refuse_incompatible, warn_at_fit_start
from fora_lightning.support import refuse_unsupported_strategy
from fora_lightning.targeting import restore_configure_model, when_targets_exist

DEFAULT_LORA_RANK = 8


class ForaLoRA(Callback):
    r"""FORA-LoRA: parameter-efficient FORA. Each target ``nn.Linear`` becomes a :class:`ForaLoraLinear`

    .. math:: y = W_0 x + b + \tfrac{\alpha}{r_{lora}} P_U B A P_Q x + U_r (\delta \odot V_r^T x),

    so the update cannot read span(Q) nor write span(U_r) except through the ``r``-dimensional spectral
    channel: the constraint holds by construction, with no gradient projection and no post-step hook.

    Lifecycle: ``setup`` injects the layers (their parameter shapes do not depend on k, so they exist
    before ``configure_optimizers``) and freezes everything but ``A``, ``B``, ``delta``; ``on_train_start``
    calibrates through the injected model (with ``B = 0``, ``delta = 0`` it is the base model) with the same
    :class:`~fora_lightning.protection.Protection` FORA uses, and fills the bases into the layers. Bases live in the model's state dict
    (layer buffers) and in this callback's state, so a resumed fit uses the same ones.

    Takes :class:`FORA`'s ``calibration`` and :class:`~fora_lightning.ForaConfig` settings (``config`` and/or
    keywords); ``lora_rank`` (r_lora, default 8 here), ``lora_alpha`` and ``lora_dropout`` shape the layers.
    ``mode`` has no effect: the bases are stored as in FORA's gradient mode (Q, or its complement when
    k > d_in/2; no anchors); ``project_gradients=False`` (FORA's update-only) is refused, there being no gradient
    projection to skip. With ``freeze_other=False`` the non-target parameters keep their
    ``requires_grad`` (and train unprotected); the wrapped base weights always stay frozen.

    ``channel_bound = tau``: after every optimizer step ``delta`` is clamped into ``[-tau S_r, tau S_r]``, the box's
    Euclidean projection, as FORA re-projects its weights (one formula, :func:`~fora_lightning.core.projection.bound_channel`).
    Clamping rather than a parametrisation ``delta = tau S tanh(raw)``: inside the box the gradient is untouched (tanh
    would damp it near the bound), and ``lora_delta`` keeps its meaning in merges, adapters and state dicts.

    Example::

        trainer = Trainer(callbacks=[ForaLoRA(calibration=keep_loader, target_modules=["q_proj", "v_proj"], lora_rank=8)])
        trainer.fit(model, datamodule=dm)
        export_lora_adapter(model, "adapter/")   # or merge_lora(model)
    """

    def __init__(
        self,
        calibration: CalibrationSource = None,
        config: ForaConfig | None = None,
        probe: CalibrationSource = None,
        **settings: Any,
    ) -> None:
        config = ForaConfig.resolve(config, settings)
        if config.extend_to is not None:
            raise ValueError(
                "ForaLoRA does not support extend_to: merge_lora(model) after the fit, then FORA(...).extend on the merged model"
            )
        config.refuse_unused("ForaLoRA")
        self.config = config if config.lora_rank is not None else replace(config, lora_rank=DEFAULT_LORA_RANK)
        self.calibration = calibration
        # bases only (a complement where smaller), no anchors: the layer keeps the update feasible
        self.protection = Protection(self.config, calibration, reprojects=False, who="FORA-LoRA")
        self.protection.monitor.source = probe  # held-out inputs for the leakage probe (see FORA)
        self._layers: dict[str, ForaLoraLinear] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._undo_presize: Callable[[], None] = lambda: None

    @property
    def subspaces(self) -> dict[str, LayerSubspace]:
        """Layer name -> its :class:`~fora_lightning.core.subspace.LayerSubspace` (empty before fit)."""
        return self.protection.subspaces

    @property
    @override
    def state_key(self) -> str:
        """``ForaLoRA{'target_modules': [...]}``, as :class:`~fora_lightning.FORA`'s."""
        return self._generate_state_key(target_modules=self.config.target_modules)

    @property
    def _legacy_state_key(self) -> str:  # Lightning's fallback lookup: checkpoints saved under the bare name
        return "ForaLoRA"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Inject the FORA-LoRA layers and freeze all but ``A``, ``B``, ``delta`` (before ``configure_optimizers``)."""
        if stage != "fit":
            return
        refuse_unsupported_strategy(trainer, "FORA-LoRA")
        refuse_incompatible(self, companions(trainer, self))
        when_targets_exist(pl_module, self.config.target_modules, lambda: self._inject(pl_module))

    def _inject(self, pl_module: LightningModule) -> None:
        c = self.config
        self._layers = inject_fora_lora(pl_module, **c.lora_layer_kwargs())
        self.protection.targets = {name: layer.base_layer for name, layer in self._layers.items()}
        mark_only_lora_trainable(pl_module, c.freeze_other)
        rank_zero_info(
            f"FORA-LoRA: {len(self._layers)} layers wrapped (lora_rank={c.lora_rank}, lora_alpha={c.lora_alpha:g}, "
            f"weight_rank={c.weight_rank}); {trainable_parameters(pl_module)}"
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The LoRA parametrisation keeps the update feasible by construction; with ``channel_bound`` a post-step
        hook on every optimizer clamps ``delta`` into ``[-tau S_r, tau S_r]`` (the box's Euclidean projection)."""
        self._layers = fora_lora_layers(pl_module)
        self.protection.targets = {name: layer.base_layer for name, layer in self._layers.items()}
        self._undo_presize = presize_before_load(trainer.strategy, self._layers)  # a sharded checkpoint loads in place
        warn_at_fit_start(trainer, pl_module, self.config, self.protection.targets, "FORA-LoRA")
        self._remove_hooks()
        if self.config.channel_bound is not None:
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``delta <- clamp(delta, -tau S_r, tau S_r)`` in every layer whose bases are set."""
        for layer in self._layers.values():
            if layer.ready:
                layer.bound_channel_(self.config.channel_bound)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bases from (in order) the checkpoint, the layers themselves, the subspace file, or calibration; then into the layers."""
        if not self.subspaces:
            held = {name: layer.subspace() for name, layer in self._layers.items() if layer.ready}
            if held and len(held) != len(self._layers):
                unset = sorted(set(self._layers) - set(held))
                raise ValueError(
                    f"FORA-LoRA layers {unset[:5]} have no bases while {sorted(held)[:5]} have: a partly loaded model?"
                )
            if held:
                rank_zero_info("FORA-LoRA: the layers already hold bases (a model trained before); keeping them")
                self.protection.subspaces = held
        self.protection.prepare(trainer, pl_module)
        self.protection.summarize(trainer, pl_module)
        for name, layer in self._layers.items():
            layer.set_subspace(self.subspaces[name])
        self.protection.monitor.start(trainer, pl_module, self._layers, self.subspaces)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The leakage probe to every logger (:mod:`~fora_lightning.monitor`)."""
        self.protection.monitor.step(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fora_report.json`` and ``fora_report.md`` in ``trainer.log_dir``."""
        self.protection.monitor.finish(trainer, pl_module, self.subspaces)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.protection.finish()
        self._remove_hooks()
        self._undo_presize()
        restore_configure_model(pl_module)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.protection.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """FORA's bases, after checking the checkpoint's LoRA layer settings (:data:`~fora_lightning.config.LORA_STRUCTURE`)
        match this callback's."""
        saved = state_dict.get("config", {})
        for key in LORA_STRUCTURE:
            mine = getattr(self.config, key)
            if key in saved and saved[key] != mine:
                raise ValueError(
                    f"the checkpoint was trained with ForaLoRA({key}={saved[key]}), this callback has {key}={mine}"
                )
        self.protection.load_state_dict(state_dict)
