"""Evaluation: exact-match generation metrics, preservation metrics, baselines and report callbacks (imported on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "CausalPerplexity": "fora_lightning.eval.metrics",
    "EWC": "fora_lightning.eval.ewc",
    "ExactMatch": "fora_lightning.eval.metrics",
    "ExactMatchReport": "fora_lightning.eval.report",
    "L2SP": "fora_lightning.eval.l2sp",
    "LayerLeakage": "fora_lightning.eval.metrics",
    "PreservationMetrics": "fora_lightning.eval.preservation",
    "TokenKL": "fora_lightning.eval.metrics",
    "TrainTargetsOnly": "fora_lightning.eval.baselines",
    "evaluate_exact_match": "fora_lightning.eval.generation",
    "evaluate_preservation": "fora_lightning.eval.preservation",
    "exact_match": "fora_lightning.eval.generation",
    "generate_greedy": "fora_lightning.eval.generation",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs and type checkers
    from fora_lightning.eval.baselines import TrainTargetsOnly  # noqa: F401
    from fora_lightning.eval.ewc import EWC  # noqa: F401
    from fora_lightning.eval.generation import evaluate_exact_match, exact_match, generate_greedy  # noqa: F401
    from fora_lightning.eval.l2sp import L2SP  # noqa: F401
    from fora_lightning.eval.metrics import CausalPerplexity, ExactMatch, LayerLeakage, TokenKL  # noqa: F401
    from fora_lightning.eval.preservation import PreservationMetrics, evaluate_preservation  # noqa: F401
    from fora_lightning.eval.report import ExactMatchReport  # noqa: F401
