"""FORA-LoRA: the parameter-efficient FORA variant (layer, injection, merge, PEFT-layout export, Callback)."""

from fora_lightning.lora.callback import ForaLoRA
from fora_lightning.lora.export import export_lora_adapter
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.lora.merge import merge_lora
from fora_lightning.lora.model import fora_lora_layers, inject_fora_lora, mark_only_lora_trainable, trainable_parameters

__all__ = [
    "ForaLoRA",
    "ForaLoraLinear",
    "export_lora_adapter",
    "fora_lora_layers",
    "inject_fora_lora",
    "mark_only_lora_trainable",
    "merge_lora",
    "trainable_parameters",
]
