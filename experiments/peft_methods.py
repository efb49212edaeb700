"""Peers run through ``peft`` itself: PEFT LoRA, OSF (orthogonal subspace fine-tuning) and CorDA-KPM.

Each is a Callback that, in ``setup`` (before the optimizer exists), wraps the LightningModule's Hugging Face
model with ``peft.get_peft_model`` on the comparison's target layers. ``get_peft_model`` injects the adapter
layers into that model in place and freezes everything else, so the module's own ``parameters()`` (what the
optimizer and the trainable-parameter count see) are exactly peft's trainable ones. After training,
:meth:`PeftPeer.merge` calls ``merge_and_unload``: the tuned model is scored *merged*, with plain
``nn.Linear`` layers under their original names (so KL and layer leakage read it as they read every method).

- :class:`PeftLoRA`: ``LoraConfig(r, lora_alpha, lora_dropout=0)``; ``W = W0 + (alpha / r) B A``.
- :class:`PeftOSF`: ``OSFConfig``: per layer ``W0 = U_h S_h V_h^T + U_l S_l V_l^T`` (top ``effective_rank`` singular
  triplets frozen), only ``U_l, S_l, V_l`` train, their gradients projected orthogonal to ``U_h`` / ``V_h``.
  ``effective_rank="fora"`` copies FORA's k layer by layer through ``rank_pattern`` (one anchored regex per layer).
- :class:`PeftCorDA`: ``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))``:
  SVD of ``W0 C`` (``C`` the input covariance on the calibration data), the adapter initialised from the *smallest*
  ``r`` triplets and removed from the frozen residual. ``preprocess_corda`` runs over FORA's calibration batches
  (``trainer.datamodule.calibration_dataloader()``), one unpadded sequence at a time (its hook reads 2-D inputs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from experiments.preservation import model_target_names
from fora_lightning.calibration import resolve_calibration
from fora_lightning.core.targets import DEFAULT_TARGETS, TargetModules
from fora_lightning.llm.report import find_hf_model


class PeftPeer(Callback):
    """Wrap the module's HF model with ``peft.get_peft_model(model, self.peft_config(...))`` in ``setup``."""

    def __init__(self, target_modules: TargetModules = DEFAULT_TARGETS) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.peft_model: nn.Module | None = None
        self.ks: dict[str, int] = {}  # per-layer protected rank, where the method has one (names as the HF model's)

    def peft_config(self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, layers: list[str]) -> Any:
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.peft_model is not None:
            return
        from peft import get_peft_model

        model = find_hf_model(pl_module)
        layers = model_target_names(pl_module, model, self.target_modules)
        self.peft_model = get_peft_model(model, self.peft_config(trainer, pl_module, model, layers))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """``merge_and_unload``: the adapters folded into the (same, in-place) HF model, which is returned."""
        if self.peft_model is None:
            raise ValueError(f"{type(self).__name__}.merge: no peft model yet (setup has not run)")
        return self.peft_model.merge_and_unload()


class PeftLoRA(PeftPeer):
    """PEFT's ``LoraConfig`` on the target layers."""

    method_name: ClassVar[str] = "peft_lora"

    def __init__(
        self, target_modules: TargetModules = DEFAULT_TARGETS, lora_rank: int = 8, lora_alpha: float = 16.0
    ) -> None:
        super().__init__(target_modules)
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha

    def peft_config(self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, layers: list[str]) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=layers)


def _anchored(name: str) -> str:
    """A ``rank_pattern`` key that ``re.search`` matches on ``name`` only (peft matches patterns by search)."""
    return f"^{re.escape(name)}$"


class PeftOSF(PeftPeer):
    """PEFT's ``OSFConfig``; ``effective_rank`` an int, a fraction in (0, 1] of min(out, in), or ``"fora"``.

    ``"fora"`` needs ``fora_ks`` (FORA's k per layer, keyed by the LightningModule's layer names); each layer
    then freezes ``clip(k, 1, min(out, in) - 1)`` singular triplets (OSF refuses 0 and trains nothing at full rank).
    """

    method_name: ClassVar[str] = "osf"

    def __init__(
        self,
        target_modules: TargetModules = DEFAULT_TARGETS,
        effective_rank: int | float | str = "fora",
        fora_ks: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(target_modules)
        if effective_rank == "fora" and fora_ks is None:
            raise ValueError("osf: effective_rank='fora' needs FORA's per-layer k: run 'fora' first, or give a number")
        self.effective_rank, self.fora_ks = effective_rank, dict(fora_ks or {})

    def peft_config(self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, layers: list[str]) -> Any:
        from peft import OSFConfig

        if self.effective_rank != "fora":
            return OSFConfig(target_modules=layers, effective_rank=self.effective_rank)
        prefix = next(n for n, m in pl_module.named_modules() if m is model)
        pattern: dict[str, int] = {}
        for name in layers:
            key = f"{prefix}.{name}" if prefix else name
            if key not in self.fora_ks:
                raise ValueError(f"osf: FORA has no k for layer {key!r} (FORA's layers: {sorted(self.fora_ks)[:3]}...)")
            w = model.get_submodule(name).weight
            pattern[_anchored(name)] = max(1, min(self.fora_ks[key], min(w.shape) - 1))
            self.ks[key] = pattern[_anchored(name)]
        return OSFConfig(target_modules=layers, effective_rank=1, rank_pattern=pattern)


def unpadded_rows(loader: Iterable[Any] | Mapping[str, Iterable[Any]]) -> Iterable[torch.Tensor]:
    """Every calibration sequence as a ``(1, length)`` tensor of its non-padding tokens."""
    loaders = loader.values() if isinstance(loader, Mapping) else [loader]
    for dl in loaders:
        for batch in dl:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                yield row.unsqueeze(0)


class PeftCorDA(PeftPeer):
    """PEFT's CorDA in knowledge-preserved mode, its covariance from FORA's calibration batches."""

    method_name: ClassVar[str] = "corda_kpm"

    def __init__(
        self, target_modules: TargetModules = DEFAULT_TARGETS, lora_rank: int = 8, lora_alpha: float | None = None
    ) -> None:
        super().__init__(target_modules)
        self.lora_rank = lora_rank
        self.lora_alpha = (
            float(lora_rank) if lora_alpha is None else lora_alpha
        )  # alpha = r: the adapter is W0's own part

    def peft_config(self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, layers: list[str]) -> Any:
        from peft import LoraConfig
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            target_modules=layers,
            init_lora_weights="corda",
            corda_config=CordaConfig(corda_method="kpm"),
        )
        loader = resolve_calibration(None, trainer, pl_module)
        device = next(model.parameters()).device
        was_training = model.training

        def run_model() -> None:
            for row in unpadded_rows(loader):
                model(input_ids=row.to(device))

        preprocess_corda(model, config, run_model=run_model)
        model.train(was_training)
        return config
