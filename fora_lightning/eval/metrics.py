"""Moved to :mod:`fora_lightning.metrics`; this old path keeps working."""

from fora_lightning.metrics import (  # noqa: F401
    CausalPerplexity,
    ExactMatch,
    LayerLeakage,
    LeakageProbe,
    TokenKL,
    leakage,
    leakage_terms,
)
