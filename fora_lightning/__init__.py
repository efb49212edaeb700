"""fora-lightning: fine-tune without eroding a capability the model already has (FORA, arXiv 2606.31092)."""

from fora_lightning.callback import FORA

__all__ = ["FORA"]
__version__ = "0.1.0"
