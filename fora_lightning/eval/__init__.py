"""Evaluation: exact-match generation metrics and report callbacks."""

from fora_lightning.eval.baselines import TrainTargetsOnly
from fora_lightning.eval.ewc import EWC
from fora_lightning.eval.generation import evaluate_exact_match, exact_match, generate_greedy
from fora_lightning.eval.l2sp import L2SP
from fora_lightning.eval.metrics import CausalPerplexity, ExactMatch, LayerLeakage, TokenKL
from fora_lightning.eval.preservation import PreservationMetrics, evaluate_preservation
from fora_lightning.eval.report import ExactMatchReport

__all__ = [
    "CausalPerplexity", "EWC", "ExactMatch", "ExactMatchReport", "L2SP", "LayerLeakage", "PreservationMetrics", "TokenKL",
    "TrainTargetsOnly", "evaluate_exact_match", "evaluate_preservation", "exact_match", "generate_greedy",
]
