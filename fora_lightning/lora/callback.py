"""The ForaLoRA Callback: FORA's calibration, with the update parametrised as a projected LoRA."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from fora_lightning.callback import FORA, when_targets_exist
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.lora.model import fora_lora_layers, inject_fora_lora, mark_only_lora_trainable, trainable_parameters


class ForaLoRA(FORA):
    r"""FORA-LoRA: parameter-efficient FORA. Each target ``nn.Linear`` becomes a :class:`ForaLoraLinear`

    .. math:: y = W_0 x + b + \tfrac{\alpha}{r_{lora}} P_U B A P_Q x + U_r (\delta \odot V_r^T x),

    so the update cannot read span(Q) nor write span(U_r) except through the ``r``-dimensional spectral
    channel: the constraint holds by construction, with no gradient projection and no post-step hook.

    Lifecycle: ``setup`` injects the layers (their parameter shapes do not depend on k, so they exist
    before ``configure_optimizers``) and freezes everything but ``A``, ``B``, ``delta``; ``on_train_start``
    calibrates through the injected model (with ``B = 0``, ``delta = 0`` it is the base model), reusing
    :meth:`FORA.estimate`, and fills the bases into the layers. Bases live in the model's state dict
    (layer buffers) and in this callback's state, so a resumed fit uses the same ones.

    Takes every :class:`FORA` argument (``calibration``, ``target_modules``, ``energy``, ``rank``,
    ``weight_rank``, ``subspaces``, ...) plus ``lora_rank`` (r_lora), ``lora_alpha`` and ``lora_dropout``.
    ``mode`` has no effect: the bases are stored as in FORA's gradient mode (Q, or its complement when
    k > d_in/2; no anchors). With ``freeze_other=False`` the non-target parameters keep their
    ``requires_grad`` (and train unprotected); the wrapped base weights always stay frozen.

    Example::

        trainer = Trainer(callbacks=[ForaLoRA(calibration=keep_loader, target_modules=["q_proj", "v_proj"], lora_rank=8)])
        trainer.fit(model, datamodule=dm)
        export_lora_adapter(model, "adapter/")   # or merge_lora(model)
    """

    def __init__(self, *args: Any, lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout}")
        if self.extend_to is not None:
            raise ValueError("ForaLoRA does not support extend_to: merge_lora(model) after the fit, then FORA(...).extend on the merged model")
        self.lora_rank, self.lora_alpha, self.lora_dropout = int(lora_rank), float(lora_alpha), float(lora_dropout)
        self.mode = "gradient"  # bases only (complement allowed), no anchors, no post-step hook
        self._layers: dict[str, ForaLoraLinear] = {}

    @property
    def state_key(self) -> str:
        return "ForaLoRA"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Inject the FORA-LoRA layers and freeze all but ``A``, ``B``, ``delta`` (before ``configure_optimizers``)."""
        if stage != "fit":
            return
        when_targets_exist(pl_module, self.target_modules, lambda: self._inject(pl_module))

    def _inject(self, pl_module: LightningModule) -> None:
        self._layers = inject_fora_lora(
            pl_module, self.target_modules, self.lora_rank, self.lora_alpha, self.lora_dropout, self.config.weight_rank
        )
        self._targets = {name: layer.base_layer for name, layer in self._layers.items()}
        mark_only_lora_trainable(pl_module, self.freeze_other)
        rank_zero_info(
            f"FORA-LoRA: {len(self._layers)} layers wrapped (lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}, "
            f"weight_rank={self.config.weight_rank}); {trainable_parameters(pl_module)}"
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing to register: the LoRA parametrisation keeps the update feasible by construction."""
        self._layers = fora_lora_layers(pl_module)
        self._targets = {name: layer.base_layer for name, layer in self._layers.items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bases from (in order) the checkpoint, the layers themselves, the subspace file, or calibration; then into the layers."""
        if not self.subspaces:
            held = {name: layer.subspace() for name, layer in self._layers.items() if layer.ready}
            if held and len(held) != len(self._layers):
                unset = sorted(set(self._layers) - set(held))
                raise ValueError(f"FORA-LoRA layers {unset[:5]} have no bases while {sorted(held)[:5]} have: a partly loaded model?")
            if held:
                rank_zero_info("FORA-LoRA: the layers already hold bases (a model trained before); keeping them")
                self.subspaces = held
        super().on_train_start(trainer, pl_module)
        for name, layer in self._layers.items():
            layer.set_subspace(self.subspaces[name])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """No gradient projection: ``A P_Q`` and ``P_U B`` are projected inside the layer."""

    def extend(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> dict[str, LayerSubspace]:
        """Not supported: FORA.extend takes U_r, S_r, V_r from the tuned weights, which FORA-LoRA keeps unmerged."""
        raise NotImplementedError("ForaLoRA.extend: merge_lora(model) first, then run FORA(...).extend on the merged model")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """FORA's bases, after checking the checkpoint's LoRA settings match this callback's."""
        saved = state_dict.get("config", {})
        for key in ("lora_rank", "lora_alpha", "weight_rank"):
            mine = getattr(self, key) if key != "weight_rank" else self.config.weight_rank
            if key in saved and saved[key] != mine:
                raise ValueError(f"the checkpoint was trained with ForaLoRA({key}={saved[key]}), this callback has {key}={mine}")
        super().load_state_dict(state_dict)

    def _config_dict(self) -> dict[str, Any]:
        return {**super()._config_dict(), "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout}
