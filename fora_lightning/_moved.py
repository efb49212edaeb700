"""Modules that left the installed package: importing one by its old path names where it went.

The comparison harness (``cli.py compare``, sweeps, the PEFT peers, the preservation evaluator) and the toy
module of ``configs/wrap_existing.yaml`` live in the repository's ``experiments/`` package beside the library,
importable from a clone's root. The library's own parts of the old ``fora_lightning.eval`` moved inside the
package; ``fora_lightning/eval/`` keeps their old paths working.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType

MOVED_OUT = {
    "fora_lightning.examples": "experiments.examples",
    **{
        f"fora_lightning.eval.{name}": f"experiments.{name}"
        for name in (
            "compare",
            "compare_output",
            "methods",
            "peft_methods",
            "preservation",
            "run_log",
            "setting",
            "sweep",
            "sweep_output",
        )
    },
}


def moved_out_message(old: str) -> str:
    """The error for an import of ``old``, a module that is now ``MOVED_OUT[old]``."""
    return (
        f"FORA: {old} moved to {MOVED_OUT[old]} (the repository's experiments/ package, not installed with "
        f"fora_lightning): run from a clone's root (e.g. `python cli.py compare ...`) and use {MOVED_OUT[old]}"
    )


class MovedOutFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``, answering only the names in :data:`MOVED_OUT` (an older install of the package,
    editable or not, must not serve a module that has left it)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        if fullname in MOVED_OUT:
            raise ModuleNotFoundError(moved_out_message(fullname), name=fullname)
        return None


def install() -> None:
    """Put one :class:`MovedOutFinder` first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, MovedOutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedOutFinder())
