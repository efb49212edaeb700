"""Hugging Face causal LMs and ``datasets`` text data for FORA fine-tuning (imported on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "CausalLMModule": "fora_lightning.llm.causal_lm",
    "TextDataModule": "fora_lightning.llm.data",
    "TextSource": "fora_lightning.llm.sources",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs and type checkers
    from fora_lightning.llm.causal_lm import CausalLMModule  # noqa: F401
    from fora_lightning.llm.data import TextDataModule  # noqa: F401
    from fora_lightning.llm.sources import TextSource  # noqa: F401
