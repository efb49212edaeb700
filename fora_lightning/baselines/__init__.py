"""Baseline Callbacks a user may compare FORA with (imported on first use).

:class:`TrainTargetsOnly` trains FORA's target weights unconstrained; :class:`L2SP` adds an L2 pull towards the
starting weights; :class:`EWC` weighs that pull by the kept capability's diagonal Fisher information.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fora_lightning._lazy import lazy_exports

_EXPORTS = {
    "EWC": "fora_lightning.baselines.ewc",
    "L2SP": "fora_lightning.baselines.l2sp",
    "TrainTargetsOnly": "fora_lightning.baselines.targets_only",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs and type checkers
    from fora_lightning.baselines.ewc import EWC  # noqa: F401
    from fora_lightning.baselines.l2sp import L2SP  # noqa: F401
    from fora_lightning.baselines.targets_only import TrainTargetsOnly  # noqa: F401
