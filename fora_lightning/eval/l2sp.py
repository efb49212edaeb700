"""Moved to :mod:`fora_lightning.baselines.l2sp`; this old path keeps working."""

from fora_lightning.baselines.l2sp import L2SP  # noqa: F401
