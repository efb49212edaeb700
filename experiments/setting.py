"""A comparison setting: the shared model, data, trainer and evaluation sets, and the methods' own arguments.

Read from a compare YAML (``configs/compare_demo.yaml``) by :func:`load_setting`; run by
:func:`experiments.compare.compare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from experiments.methods import METHODS

METRICS = ("exact_match", "perplexity")


@dataclass
class EvalSet:
    """A JSON-lines file of prompt/answer pairs scored by greedy exact match or by response perplexity."""

    path: str
    name: str = ""
    metric: str = "exact_match"
    limit: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 64
    prompt_field: str = "prompt"
    answer_field: str = "response"
    stop: str | None = None  # cut generations at the first occurrence (e.g. "\n" after a few-shot answer)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"evaluation metric must be one of {METRICS}, got {self.metric!r} ({self.path})")
        self.name = self.name or Path(self.path).parent.name or Path(self.path).stem

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "exact_match"

    @property
    def label(self) -> str:
        return f"{self.name} {self.metric.replace('_', ' ')}"


@dataclass
class Setting:
    """One comparison: the shared model, data, trainer and evaluation, and the methods' own arguments."""

    setting: str
    model: dict[str, Any]
    data: dict[str, Any]
    preserved: EvalSet
    new_task: EvalSet
    heldout: EvalSet
    methods: dict[str, dict[str, Any]]
    target_modules: list[str] | str
    trainer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, EvalSet] = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "results"
    threads: int | None = None
    sweeps: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # method -> {knob: [values]} (``--sweep``)

    def cap_limits(self, limit: int) -> None:
        """At most ``limit`` items in every evaluation set."""
        for s in (self.preserved, self.new_task, self.heldout, *self.extra.values()):
            s.limit = min(s.limit or limit, limit)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Setting:
        cfg = dict(cfg)
        unknown = set(cfg) - {
            "setting",
            "model",
            "data",
            "evaluation",
            "methods",
            "target_modules",
            "trainer",
            "seed",
            "output_dir",
            "threads",
            "sweeps",
        }
        if unknown:
            raise ValueError(f"compare config: unknown keys {sorted(unknown)}")
        ev = dict(cfg.pop("evaluation"))
        missing = {"preserved", "new_task"} - set(ev)
        if missing:
            raise ValueError(f"compare config: evaluation needs {sorted(missing)}")
        preserved = EvalSet(**ev.pop("preserved"))
        new_task = EvalSet(**ev.pop("new_task"))
        heldout = EvalSet(**ev.pop("heldout")) if "heldout" in ev else replace(preserved)
        extra = {name: EvalSet(**{"name": name, **spec}) for name, spec in (ev.pop("extra", None) or {}).items()}
        if ev:
            raise ValueError(f"compare config: unknown evaluation keys {sorted(ev)}")
        methods = {name: dict(args or {}) for name, args in cfg.pop("methods").items()}
        bad = set(methods) - set(METHODS)
        if bad:
            raise ValueError(f"compare config: unknown methods {sorted(bad)}; choose from {METHODS}")
        if {"weight_projection", "random"} & set(methods) and "fora" not in methods:
            raise ValueError("weight_projection and random copy FORA's k per layer: include 'fora' in methods")
        sweeps = {name: dict(knobs or {}) for name, knobs in (cfg.pop("sweeps", None) or {}).items()}
        for name, knobs in sweeps.items():
            if name not in methods:
                raise ValueError(f"compare config: sweeps.{name} has no entry in methods; add methods.{name}")
            for knob, values in knobs.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(
                        f"compare config: sweeps.{name}.{knob} must be a non-empty list of values, got {values!r}"
                    )
        return cls(
            sweeps=sweeps, preserved=preserved, new_task=new_task, heldout=heldout, extra=extra, methods=methods, **cfg
        )


def load_setting(path: str | Path) -> Setting:
    with open(path, encoding="utf-8") as f:
        return Setting.from_dict(yaml.safe_load(f))
