"""Old home of the metrics, baselines and exact-match report (kept so configs that name it keep working).

New places: :mod:`fora_lightning.metrics`, :mod:`fora_lightning.baselines`, :mod:`fora_lightning.llm.generation`,
:mod:`fora_lightning.llm.report`. The comparison harness moved to the repository's ``experiments/`` package
(:mod:`fora_lightning._moved` names it when an old path is imported).
"""

from __future__ import annotations

from typing import Any

from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "CausalPerplexity": "fora_lightning.metrics",
    "EWC": "fora_lightning.baselines.ewc",
    "ExactMatch": "fora_lightning.metrics",
    "ExactMatchReport": "fora_lightning.llm.report",
    "L2SP": "fora_lightning.baselines.l2sp",
    "LayerLeakage": "fora_lightning.metrics",
    "TokenKL": "fora_lightning.metrics",
    "TrainTargetsOnly": "fora_lightning.baselines.targets_only",
    "evaluate_exact_match": "fora_lightning.llm.generation",
    "exact_match": "fora_lightning.llm.generation",
    "generate_greedy": "fora_lightning.llm.generation",
}
_MOVED_OUT = {"PreservationMetrics": "experiments.preservation", "evaluate_preservation": "experiments.preservation"}
__all__ = list(_EXPORTS)
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _MOVED_OUT:
        raise AttributeError(
            f"FORA: fora_lightning.eval.{name} moved to {_MOVED_OUT[name]}.{name} (the repository's experiments/ "
            "package, not installed with fora_lightning): run from a clone's root"
        )
    return _lazy_getattr(name)
