"""Lazy package exports (PEP 562): a package maps each public name to its module, imported on first access.

``import fora_lightning`` then costs nothing; ``fora_lightning.CausalLMModule`` imports transformers only when
touched. A submodule is imported when first read as an attribute (``fora_lightning.llm.causal_lm``), as an
eager ``__init__`` used to make possible. Values are cached in the package namespace. A submodule that left the
package (:data:`fora_lightning._moved.MOVED_OUT`) is refused with its new place.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

from fora_lightning._moved import MOVED_OUT, moved_out_message


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` is the attribute ``name`` of module ``exports[name]``;
    any other name that is a submodule of ``package`` is that submodule."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in {m.name for m in pkgutil.iter_modules(sys.modules[package].__path__)}:
            value = importlib.import_module(f"{package}.{name}")
        elif f"{package}.{name}" in MOVED_OUT:  # e.g. a config's class_path naming a module that left the package
            raise AttributeError(moved_out_message(f"{package}.{name}"))
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
