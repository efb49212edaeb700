"""fora-lightning: fine-tune without eroding a capability the model already has (FORA, arXiv 2606.31092).

The public names are imported on first use (PEP 562): ``import fora_lightning`` loads neither Lightning nor
transformers, and ``fora_lightning.core`` needs only torch and safetensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fora_lightning import _moved
from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "FORA": "fora_lightning.callback",
    "ForaConfig": "fora_lightning.config",
    "ForaModule": "fora_lightning.module",
    "CausalLMModule": "fora_lightning.llm.causal_lm",
    "TextDataModule": "fora_lightning.llm.data",
    "TextSource": "fora_lightning.llm.sources",
    "ForaLoRA": "fora_lightning.lora.callback",
    "export_lora_adapter": "fora_lightning.lora.export",
    "merge_lora": "fora_lightning.lora.merge",
    "ProtectionViolation": "fora_lightning.monitor",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
_moved.install()  # an old path of a module that left the package names its new place

if TYPE_CHECKING:  # the same names, for IDEs and type checkers
    from fora_lightning.callback import FORA  # noqa: F401
    from fora_lightning.config import ForaConfig  # noqa: F401
    from fora_lightning.llm.causal_lm import CausalLMModule  # noqa: F401
    from fora_lightning.llm.data import TextDataModule  # noqa: F401
    from fora_lightning.llm.sources import TextSource  # noqa: F401
    from fora_lightning.lora.callback import ForaLoRA  # noqa: F401
    from fora_lightning.lora.export import export_lora_adapter  # noqa: F401
    from fora_lightning.lora.merge import merge_lora  # noqa: F401
    from fora_lightning.module import ForaModule  # noqa: F401
    from fora_lightning.monitor import ProtectionViolation  # noqa: F401
