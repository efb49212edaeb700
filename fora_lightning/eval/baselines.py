"""Moved to :mod:`fora_lightning.baselines.targets_only`; this old path keeps working."""

from fora_lightning.baselines.targets_only import TrainTargetsOnly  # noqa: F401
