"""Gather a sharded Hugging Face model (FSDP2) into one unsharded CPU copy on rank 0, FORA-LoRA layers included."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from fora_lightning.lora import fora_lora_layers
from fora_lightning.lora.layer import ForaLoraLinear


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s full state dict (every parameter and persistent buffer unsharded, on CPU) on global rank 0, ``{}``
    on the others: :func:`torch.distributed.checkpoint.state_dict.get_model_state_dict` with ``full_state_dict=True,
    cpu_offload=True``. A collective on FSDP2 (``fully_shard``) models: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def unsharded_copy(model: PreTrainedModel, state: dict[str, Tensor]) -> PreTrainedModel:
    """A plain CPU ``AutoModelForCausalLM`` of ``model.config`` holding ``state`` (from :func:`full_state_dict`).

    Built on the meta device (no random init), with a :class:`ForaLoraLinear` (same ``lora_rank``, ``lora_alpha``,
    ``weight_rank``) wherever ``model`` has one, then filled by ``load_state_dict(strict=True, assign=True)``;
    non-persistent buffers (e.g. rotary ``inv_freq``), which no state dict holds, are copied from ``model``, and each
    parameter's ``requires_grad`` (which ones trained: ``export_lora_adapter`` saves those) too.
    """
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        for name, live in fora_lora_layers(model).items():
            parent_name, _, child = name.rpartition(".")
            parent = copy.get_submodule(parent_name) if parent_name else copy
            dropout = float(getattr(live.lora_dropout, "p", 0.0))
            layer = ForaLoraLinear(
                getattr(parent, child), live.lora_rank, live.lora_alpha, dropout, live.weight_rank, name=live.name
            )
            setattr(parent, child, layer)
    copy.load_state_dict(state, strict=True, assign=True)
    trained = {n: p.requires_grad for n, p in model.named_parameters()}  # which parameters trained (for the export)
    for n, p in copy.named_parameters():
        p.requires_grad_(trained.get(n, p.requires_grad))
    buffers = dict(model.named_buffers())
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            owner = copy.get_submodule(module_name) if module_name else copy
            owner.register_buffer(attr, buffers[name].detach().cpu().clone(), persistent=False)
    return copy.eval()
