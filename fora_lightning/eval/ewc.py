"""Moved to :mod:`fora_lightning.baselines.ewc`; this old path keeps working."""

from fora_lightning.baselines.ewc import EWC  # noqa: F401
