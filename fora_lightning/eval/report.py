"""Moved to :mod:`fora_lightning.llm.report`; this old path keeps working."""

from fora_lightning.llm.report import (  # noqa: F401
    ExactMatchReport,
    find_hf_model,
    format_table,
)
