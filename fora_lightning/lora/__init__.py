"""FORA-LoRA: the parameter-efficient FORA variant (layer, injection, merge, PEFT-layout export, Callback).

Imported on first use: the layer, injection and merge need torch only; ``ForaLoRA`` brings in Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "ForaLoRA": "fora_lightning.lora.callback",
    "ForaLoraLinear": "fora_lightning.lora.layer",
    "export_lora_adapter": "fora_lightning.lora.export",
    "fora_lora_layers": "fora_lightning.lora.model",
    "inject_fora_lora": "fora_lightning.lora.model",
    "mark_only_lora_trainable": "fora_lightning.lora.model",
    "merge_lora": "fora_lightning.lora.merge",
    "trainable_parameters": "fora_lightning.lora.model",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs and type checkers
    from fora_lightning.lora.callback import ForaLoRA  # noqa: F401
    from fora_lightning.lora.export import export_lora_adapter  # noqa: F401
    from fora_lightning.lora.layer import ForaLoraLinear  # noqa: F401
    from fora_lightning.lora.merge import merge_lora  # noqa: F401
    from fora_lightning.lora.model import (  # noqa: F401
        fora_lora_layers,
        inject_fora_lora,
        mark_only_lora_trainable,
        trainable_parameters,
    )
