"""The optimizer's step taken one layer at a time, so that each layer's step can be projected without anchors.

FORA keeps ``W - W0`` in the feasible set S. Projecting the optimizer's *step* ``W_after - W_before`` needs the
weight from before the step; holding that for every layer at once would double the protected weights' memory. This
wrapper replaces ``optimizer.step`` (an instance attribute, as torch's LR schedulers do) by: the closure (forward and
backward, as the plain step runs it), then one step of every parameter that is no unit's, then, unit by unit, a copy
of the unit's weights (:meth:`Unit.before`), one step of the unit's parameters alone, and the unit's projection
(:meth:`Unit.after`). At any time one unit's copy is held (one layer; one FSDP1 flat unit).

Each sub-step runs the original ``step`` with the other parameters removed from the parameter groups for its duration,
so per-parameter optimizers (SGD, Adam, AdamW, their foreach and fused forms, Adagrad, RMSprop, bitsandbytes 8-bit
Adam) take exactly the step they would take whole. An optimizer whose update of one parameter reads the others (LBFGS,
a global gradient-norm clip inside ``step``) is refused by name (:data:`PER_PARAMETER`); others are trusted with a
``FORA:`` warning. A step the GradScaler skips never reaches the wrapper, so nothing is projected (nothing moved).
Plain torch: no Lightning import.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

# optimizers whose step updates each parameter from its own gradient and state only (safe to step in parts)
PER_PARAMETER = (
    "SGD",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "Rprop",
    "ASGD",
    "Adafactor",
    "Adam8bit",
    "AdamW8bit",
    "PagedAdamW8bit",
    "PagedAdamW",
    "PagedAdamW32bit",
    "AdamW32bit",
    "Lion",
    "Lion8bit",
)
# optimizers known to couple parameters in their step: refused
COUPLED = ("LBFGS",)


class Unit(Protocol):
    """One layer (or FSDP1 unit) whose step is projected: its parameters, and what to do around its step."""

    params: Sequence[Tensor]

    def before(self) -> Any:
        """Called right before the unit's step: return the state the projection needs (a copy of the weight)."""

    def after(self, saved: Any) -> None:
        """Called right after the unit's step with what :meth:`before` returned."""


def check_optimizer(optimizer: torch.optim.Optimizer, who: str = "FORA") -> None:
    """Refuse an optimizer that couples parameters in its step; warn for one not known to be per-parameter."""
    name = type(optimizer).__name__
    if name in COUPLED:
        raise ValueError(
            f"{who}: {name} updates each parameter from all of them (it re-evaluates the closure), so its step cannot be "
            "projected layer by layer. Use a per-parameter optimizer (SGD, Adam, AdamW, ...), or reprojection='anchors'"
        )
    if name not in PER_PARAMETER:
        warnings.warn(
            f"{who}: optimizer {name} is stepped one layer at a time (reprojection='step'); this is exact for optimizers "
            f"whose update of a parameter reads only its own gradient and state. If {name} couples parameters (a global "
            "norm clip inside step(), a trust ratio over all layers), set reprojection='anchors'",
            stacklevel=3,
        )


class LayerwiseStep:
    """Installed on one optimizer: its ``step`` runs the rest first, then each :class:`Unit` in order, then ``done``.

    ``install`` and ``remove`` are idempotent; ``remove`` restores whatever ``step`` was before (a scheduler's wrapper).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, units: Sequence[Unit], done: Callable[[], None] | None = None
    ) -> None:
        self.optimizer, self.done = optimizer, done
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.units = [u for u in units if any(id(p) in owned for p in u.params)]  # units this optimizer trains
        self._had_attr = "step" in optimizer.__dict__
        self._original: Callable[..., Any] = optimizer.step
        self._installed = False
        self._key: tuple[tuple[int, int], ...] | None = None
        self._cached: tuple[list[list[Tensor]], list[list[list[Tensor]]]] = ([], [])

    def install(self) -> LayerwiseStep:
        if not self._installed and self.units:
            wrapper = self

            def step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
                return wrapper(closure, **kwargs)

            if hasattr(self._original, "_wrapped_by_lr_sched"):  # an LR scheduler's wrapper is inside ours
                step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
            self.optimizer.step = types.MethodType(step, self.optimizer)  # bound, as LR schedulers expect
            self._installed = True
        return self

    def remove(self) -> None:
        if not self._installed:
            return
        if self._had_attr:
            self.optimizer.step = self._original
        else:
            del self.optimizer.step
        self._installed = False

    def __call__(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.optimizer.param_groups
        full = [g["params"] for g in groups]
        rest, per_unit = self._split(full)
        try:
            for g, params in zip(groups, rest):
                g["params"] = params
            if any(p.grad is not None for params in rest for p in params):
                self._original(**kwargs)
            for unit, lists in zip(self.units, per_unit):
                for g, params in zip(groups, lists):
                    g["params"] = params
                saved = unit.before()
                self._original(**kwargs)
                unit.after(saved)
        finally:
            for g, params in zip(groups, full):
                g["params"] = params
            if self.done is not None:
                self.done()
        return loss

    def _split(self, full: list[list[Tensor]]) -> tuple[list[list[Tensor]], list[list[list[Tensor]]]]:
        """Per group: the parameters of no unit, and each unit's (cached while the groups' lists are the same)."""
        key = tuple((id(params), len(params)) for params in full)
        if self._key != key:
            unit_ids = {id(p) for u in self.units for p in u.params}
            rest = [[p for p in params if id(p) not in unit_ids] for params in full]
            per_unit = []
            for unit in self.units:
                ids = {id(p) for p in unit.params}
                per_unit.append([[p for p in params if id(p) in ids] for params in full])
            self._key, self._cached = key, (rest, per_unit)
        return self._cached
