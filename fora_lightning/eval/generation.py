"""Moved to :mod:`fora_lightning.llm.generation`; this old path keeps working."""

from fora_lightning.llm.generation import (  # noqa: F401
    ExactMatchResult,
    evaluate_exact_match,
    exact_match,
    generate_greedy,
    greedy_extend,
    read_pairs,
)
