"""fora-lightning: fine-tune without eroding a capability the model already has (FORA, arXiv 2606.31092)."""

from fora_lightning.callback import FORA
from fora_lightning.config import ForaConfig
from fora_lightning.llm import CausalLMModule, TextDataModule, TextSource
from fora_lightning.lora import ForaLoRA, export_lora_adapter, merge_lora
from fora_lightning.module import ForaModule

__all__ = ["FORA", "ForaConfig", "ForaModule", "CausalLMModule", "TextDataModule", "TextSource", "ForaLoRA", "export_lora_adapter", "merge_lora"]
__version__ = "0.1.0"
