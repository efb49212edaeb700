"""A sweep over each method's own knob, over seeds: the points, their mean and spread, the Pareto front.

A compare YAML's ``sweeps:`` block maps a method to ``{knob: [values]}``; each value of each knob is one
*point*, the method's own arguments with that one knob replaced (one knob at a time, not a grid; a dotted
knob such as ``model.lr`` reaches into the per-method ``model`` overrides). The method's own configuration
is always a point too (``knob`` ``None``); a value equal to it adds nothing.

Over seeds, :func:`aggregate` gives each numeric field's mean, standard deviation (``ddof = 1``; 0 for one
seed), min and max; :func:`pareto_mask` marks the points no other point beats on both axes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Point:
    """One method at one value of one knob (``knob`` ``None``: the method's own configuration)."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)
    knob: str | None = None
    value: Any = None

    @property
    def key(self) -> str:
        """``fora`` for the method's own point, ``fora[energy=0.9]`` for a swept one."""
        return self.method if self.knob is None else f"{self.method}[{self.knob}={self.value}]"


def set_knob(args: Mapping[str, Any], knob: str, value: Any) -> dict[str, Any]:
    """A copy of ``args`` with ``knob`` (dotted for nested mappings, e.g. ``model.lr``) set to ``value``."""
    out = copy.deepcopy(dict(args))
    *path, leaf = knob.split(".")
    node = out
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"sweep knob {knob!r}: {part!r} is not a mapping in {dict(args)}")
    node[leaf] = value
    return out


def expand(
    methods: Mapping[str, Mapping[str, Any]],
    chosen: Sequence[str],
    sweeps: Mapping[str, Mapping[str, Sequence[Any]]] | None,
) -> list[Point]:
    """Every method's own point, then its swept points, in the order of ``chosen``."""
    points: list[Point] = []
    for name in chosen:
        base = dict(methods[name])
        points.append(Point(name, base))
        for knob, values in ((sweeps or {}).get(name) or {}).items():
            for value in values:
                args = set_knob(base, knob, value)
                if args != base:
                    points.append(Point(name, args, knob, value))
    return points


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{field: {"mean", "std", "min", "max", "n"}}`` over ``rows`` for every numeric field they share."""
    if not rows:
        raise ValueError("aggregate: no rows (no seed produced this point)")
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(r[key]) for r in rows]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}
    return out


def pareto_mask(xs: Sequence[float], ys: Sequence[float], higher_x: bool = True, higher_y: bool = True) -> list[bool]:
    """``True`` where no other point is at least as good on both axes and strictly better on one."""
    sx, sy = (1.0 if higher_x else -1.0), (1.0 if higher_y else -1.0)
    pts = [(sx * x, sy * y) for x, y in zip(xs, ys, strict=True)]
    return [not any(qx >= px and qy >= py and (qx > px or qy > py) for qx, qy in pts) for px, py in pts]
