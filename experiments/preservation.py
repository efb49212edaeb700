"""Model- and layer-level preservation of a kept capability, against a frozen copy of the base model.

:func:`evaluate_preservation` runs held-out batches of the kept capability through the base and the
tuned model and returns ``KL(base || tuned)`` per token, the tuned (and base) perplexity, and each
target layer's leakage ``||(W - W0) X|| / ||W0 X||`` with ``X`` the layer's inputs *in the base model*
(the distribution the protected subspace was estimated on). :class:`PreservationMetrics` logs the same
during validation, on the preserved-capability dataloader.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from fora_lightning.core.targets import (
    DEFAULT_TARGETS,
    TargetModules,
    is_target_layer,
    name_matches,
    resolve_target_modules,
    weight_matrix,
)
from fora_lightning.llm.report import find_hf_model
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.metrics import CausalPerplexity, LayerLeakage, TokenKL


def target_names(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the linear layers (plain or FORA-LoRA-wrapped) matched by ``target_modules``."""
    target_modules = resolve_target_modules(model, target_modules)
    names = [
        n
        for n, m in model.named_modules()
        if n
        and (is_target_layer(m) or isinstance(m, ForaLoraLinear))
        and name_matches(n, target_modules)
        and ".base_layer" not in n
    ]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer of {type(model).__name__}")
    return names


def model_target_names(pl_module: nn.Module, model: nn.Module, target_modules: TargetModules) -> list[str]:
    """:func:`target_names` matched on ``pl_module``'s names (as the Callbacks match them), returned relative
    to its submodule ``model`` (e.g. ``model.model.layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``)."""
    prefix = next((n for n, m in pl_module.named_modules() if m is model), None)
    if prefix is None:
        raise ValueError(f"{type(model).__name__} is not a submodule of {type(pl_module).__name__}")
    names = target_names(pl_module, target_modules)
    return [n.removeprefix(prefix + ".") for n in names] if prefix else names


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The layer's current weight: ``W`` of an ``nn.Linear``, ``W0 + (W - W0)`` of a FORA-LoRA layer."""
    if isinstance(module, ForaLoraLinear):
        w0 = module.weight
        return w0 if not module.ready else (w0.double() + module.delta_weight()).to(w0.dtype)
    return weight_matrix(module)


def _logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out


class PreservationState:
    """The metrics of one evaluation pass: KL, tuned and base perplexity, per-layer leakage."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.kl = TokenKL()
        self.ppl = CausalPerplexity()
        self.ppl_base = CausalPerplexity()
        self.leakage = LayerLeakage(layers)

    def to(self, device: torch.device) -> PreservationState:
        for m in (self.kl, self.ppl, self.ppl_base, self.leakage):
            m.to(device)
        return self

    @torch.no_grad()
    def update(self, base: nn.Module, tuned: nn.Module, batch: Mapping[str, Tensor]) -> None:
        """One batch (``input_ids``, ``attention_mask``, optional ``labels``): base forward (hooked), tuned forward."""
        layers = self.leakage.layers
        base_mods = {n: base.get_submodule(n) for n in layers}
        base_w = {n: effective_weight(m) for n, m in base_mods.items()}
        tuned_w = {n: effective_weight(tuned.get_submodule(n)) for n in layers}
        mask = batch.get("attention_mask")
        with self.leakage.probe(base_mods, base_w, tuned_w) as probe, probe.batch(mask):
            base_logits = _logits(base, batch)
        tuned_logits = _logits(tuned, batch)
        self.kl.update(base_logits, tuned_logits, mask)
        labels = batch.get("labels")
        self.ppl.update(tuned_logits, batch["input_ids"], mask, labels)
        self.ppl_base.update(base_logits, batch["input_ids"], mask, labels)

    def compute(self) -> dict[str, Any]:
        """``{"kl", "ppl", "ppl_base", "leakage_mean", "leakage": {layer: value}}``."""
        leak = self.leakage.as_dict()
        return {
            "kl": float(self.kl.compute()),
            "ppl": float(self.ppl.compute()),
            "ppl_base": float(self.ppl_base.compute()),
            "leakage_mean": sum(leak.values()) / len(leak),
            "leakage": leak,
        }

    def reset(self) -> None:
        for m in (self.kl, self.ppl, self.ppl_base, self.leakage):
            m.reset()


def evaluate_preservation(
    base: nn.Module, tuned: nn.Module, batches: Iterable[Mapping[str, Tensor]], layers: Sequence[str]
) -> dict[str, Any]:
    """:meth:`PreservationState.compute` over ``batches`` (both models in eval mode, on the tuned model's device)."""
    device = next(tuned.parameters()).device
    state = PreservationState(layers).to(device)
    flags = [(m, m.training) for m in (base, tuned)]
    base.eval()
    tuned.eval()
    try:
        for batch in batches:
            state.update(base, tuned, {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)})
    finally:
        for m, flag in flags:
            m.train(flag)
    return state.compute()


class PreservationMetrics(Callback):
    """Log ``KL(base || tuned)``, perplexity and mean leakage on the preserved-capability validation loader.

    A frozen copy of the Hugging Face model inside the LightningModule is taken in ``setup`` (before
    training; costs one model of memory). During validation, batches of the loader named ``preserve``
    in the datamodule's ``val_dataloader_names`` (else index ``dataloader_idx``) also run through the
    base copy; at epoch end ``{prefix}/kl``, ``{prefix}/ppl`` and ``{prefix}/leakage_mean`` are logged
    (with ``{prefix}/leakage/<layer>`` when ``per_layer``). Sum-state metrics: exact under DDP.
    """

    def __init__(
        self,
        target_modules: TargetModules = DEFAULT_TARGETS,
        dataloader_name: str = "preserve",
        dataloader_idx: int = 1,
        prefix: str = "val/preserve",
        per_layer: bool = False,
    ) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.dataloader_name, self.dataloader_idx = dataloader_name, dataloader_idx
        self.prefix, self.per_layer = prefix, per_layer
        self.base: nn.Module | None = None
        self.state: PreservationState | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.base is None:
            model = find_hf_model(pl_module)
            self.base = copy.deepcopy(model).eval().requires_grad_(False)
            self.state = PreservationState(model_target_names(pl_module, model, self.target_modules))

    def _preserved_idx(self, trainer: Trainer) -> int:
        names = getattr(trainer.datamodule, "val_dataloader_names", None)
        return names.index(self.dataloader_name) if names and self.dataloader_name in names else self.dataloader_idx

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.base.to(pl_module.device)
        self.state.to(pl_module.device).reset()

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == self._preserved_idx(trainer):
            self.state.update(self.base, find_hf_model(pl_module), batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1 and self.state.kl.tokens.item() == 0:  # no preserved loader this epoch
            return
        result = self.state.compute()
        metrics = {f"{self.prefix}/{k}": result[k] for k in ("kl", "ppl", "leakage_mean")}
        if self.per_layer:
            metrics.update({f"{self.prefix}/leakage/{n}": v for n, v in result["leakage"].items()})
        for key, value in metrics.items():
            pl_module.log(key, value, sync_dist=False)  # the states are already summed over ranks
        self.state.reset()
