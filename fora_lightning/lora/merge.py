"""Fold FORA-LoRA updates into the base weights: ``W = W0 + (alpha/r) P_U B A P_Q + U_r diag(delta) V_r^T``."""

from __future__ import annotations

import torch
from torch import nn

from fora_lightning.core.targets import dense_weight, is_quantized, quantization_of, weight_matrix
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.lora.model import fora_lora_layers


@torch.no_grad()
def merge_lora(module: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every FORA-LoRA layer of ``module`` into its base ``nn.Linear`` (or ``Conv1D``) and unwrap it, in place.

    ``merge_and_unload`` semantics: each :class:`ForaLoraLinear` is replaced by its ``base_layer`` whose
    weight becomes ``W0 + delta_weight()`` (the update computed in float64, then cast to the weight's
    dtype); the LoRA parameters and bases are dropped. The base parameters keep their ``requires_grad``
    (frozen after FORA-LoRA training). A layer whose bases were never set is unwrapped unchanged if its
    update is zero, else ``RuntimeError``. Returns ``module`` (or the base layer, if ``module`` itself is one
    FORA-LoRA layer); a Hugging Face model can then be saved with ``save_pretrained``.

    A quantized bitsandbytes base (QLoRA) is refused (``TypeError``): writing ``W0 + update`` back into 4-bit/8-bit
    storage would re-quantize it and lose most of the update. With ``dequantize=True`` each such layer becomes a plain
    ``nn.Linear`` holding the dequantized ``W0`` plus the update (in ``W0``'s dequantized dtype): a float model, no
    longer 4-bit. To keep the 4-bit base, export the adapter instead (:func:`~fora_lightning.lora.export.export_lora_adapter`).
    """
    if isinstance(module, ForaLoraLinear):
        return _merged_base(module, dequantize)
    quantized = [n for n, layer in fora_lora_layers(module).items() if is_quantized(layer.base_layer)]
    if quantized and not dequantize:
        raise TypeError(
            f"merge_lora: FORA-LoRA layer '{quantized[0]}' wraps {quantization_of(module.get_submodule(quantized[0]).base_layer)} "
            f"({len(quantized)} quantized base(s)): merging into 4-bit/8-bit storage would re-quantize W0 + update and "
            "lose most of the update. Keep the quantized base and export_lora_adapter(model, dir) (load it with PEFT), or "
            "merge_lora(model, dequantize=True) to replace each by a float nn.Linear (dequantized W0 + update)"
        )
    for name, layer in fora_lora_layers(module).items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _merged_base(layer, dequantize))
    return module


def _merged_base(layer: ForaLoraLinear, dequantize: bool) -> nn.Module:
    base = layer.base_layer
    if is_quantized(base):
        if not dequantize:
            raise TypeError(
                f"merge_lora: FORA-LoRA layer '{layer.name}' wraps {quantization_of(base)}: merging would re-quantize it; "
                "export_lora_adapter instead, or merge_lora(layer, dequantize=True) for a float nn.Linear"
            )
        base = _dequantized(base)
    if layer.ready:
        w = weight_matrix(base)  # d_out x d_in (the transposed view of a Conv1D's weight)
        w.copy_((w.double() + layer.delta_weight()).to(w.dtype))
    elif bool(layer.lora_B.any()) or bool(layer.lora_delta.any()):
        raise RuntimeError(f"FORA-LoRA layer '{layer.name}' has a nonzero update but no bases: cannot merge it")
    return base


def _dequantized(base: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` with ``base``'s dequantized weight (:func:`dense_weight`) and bias, frozen as ``base`` was."""
    w = dense_weight(base)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=w.dtype)
    linear.weight.copy_(w)
    if base.bias is not None:
        linear.bias.copy_(base.bias.detach())
    linear.requires_grad_(False)
    return linear
