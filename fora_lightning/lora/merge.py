"""Fold FORA-LoRA updates into the base weights: ``W = W0 + (alpha/r) P_U B A P_Q + U_r diag(delta) V_r^T``."""

from __future__ import annotations

import torch
from torch import nn

from fora_lightning.core.targets import weight_matrix
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.lora.model import fora_lora_layers


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Merge every FORA-LoRA layer of ``module`` into its base ``nn.Linear`` (or ``Conv1D``) and unwrap it, in place.

    ``merge_and_unload`` semantics: each :class:`ForaLoraLinear` is replaced by its ``base_layer`` whose
    weight becomes ``W0 + delta_weight()`` (the update computed in float64, then cast to the weight's
    dtype); the LoRA parameters and bases are dropped. The base parameters keep their ``requires_grad``
    (frozen after FORA-LoRA training). A layer whose bases were never set is unwrapped unchanged if its
    update is zero, else ``RuntimeError``. Returns ``module`` (or the base layer, if ``module`` itself is one
    FORA-LoRA layer); a Hugging Face model can then be saved with ``save_pretrained``.
    """
    if isinstance(module, ForaLoraLinear):
        return _merged_base(module)
    for name, layer in fora_lora_layers(module).items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _merged_base(layer))
    return module


def _merged_base(layer: ForaLoraLinear) -> nn.Module:
    base = layer.base_layer
    if layer.ready:
        w = weight_matrix(base)  # d_out x d_in (the transposed view of a Conv1D's weight)
        w.copy_((w.double() + layer.delta_weight()).to(w.dtype))
    elif bool(layer.lora_B.any()) or bool(layer.lora_delta.any()):
        raise RuntimeError(f"FORA-LoRA layer '{layer.name}' has a nonzero update but no bases: cannot merge it")
    return base
