"""Hugging Face causal LMs and ``datasets`` text data for FORA fine-tuning."""

from fora_lightning.llm.causal_lm import CausalLMModule
from fora_lightning.llm.data import TextDataModule
from fora_lightning.llm.sources import TextSource

__all__ = ["CausalLMModule", "TextDataModule", "TextSource"]
