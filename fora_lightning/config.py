"""ForaConfig: every FORA setting, in one place (as PEFT's ``LoraConfig``).

One dataclass is read by the :class:`~fora_lightning.FORA` and :class:`~fora_lightning.ForaLoRA` Callbacks,
by :class:`~fora_lightning.ForaModule` (and so by LightningCLI, which shows each field with its help), and
written to the Callback's ``state_dict``, the subspace file's header and ``ForaModule`` checkpoints. The
fields that choose the bases come from :class:`~fora_lightning.core.subspace.SubspaceConfig` (the math's
own settings, no Lightning); this class adds those of the training glue.
"""

from __future__ import annotations

import math
import numbers
import os
import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fora_lightning.core.subspace import SubspaceConfig
from fora_lightning.core.targets import DEFAULT_TARGETS

Mode = Literal["update", "gradient"]
Tier = Literal["bases", "step", "runtime"]
TIERS: tuple[Tier, ...] = ("bases", "step", "runtime")
BOTH, FORA_ONLY, LORA_ONLY = ("FORA", "ForaLoRA"), ("FORA",), ("ForaLoRA",)


# the covariance pass's defaults: benchmarks/results/calibration_cost.md
PANEL_DEFAULT, PRODUCT_DEFAULT = 512, "input"


def _setting(
    default: Any = MISSING,
    *,
    tier: Tier,
    help: str,
    factory: Any = MISSING,
    used_by: tuple[str, ...] = BOTH,
    lora_layer: bool = False,
    calibration: bool = False,
) -> Any:
    """A field whose metadata says what it shapes (``tier``), who reads it (``used_by``) and its one help text.

    ``tier``: ``"bases"`` (compared when stored bases are reused, saved), ``"step"`` (how training uses the bases:
    saved, compared where it matters) or ``"runtime"`` (how this run computes or reports: neither saved with the
    bases nor compared). ``lora_layer``: it fixes the shapes or function of FORA-LoRA's layers. ``calibration``: read
    only by the calibration pass (``source="activations"``): set away from its default with another source, refused.
    """
    metadata = {"help": help, "tier": tier, "used_by": used_by, "lora_layer": lora_layer, "calibration": calibration}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ForaConfig(SubspaceConfig):
    """FORA's settings. ``ForaConfig(energy=0.95, target_modules=["q_proj", "v_proj"])``.

    The basis fields (``energy``, ``rank``, ``max_rank``, ``weight_rank``, ``source``, ``seed``) are
    :class:`~fora_lightning.core.subspace.SubspaceConfig`'s; see there. Each field's metadata declares its
    ``tier`` (what it shapes: :data:`BASIS_SETTINGS` are compared on reuse, :data:`SAVED_SETTINGS` are stored with the
    bases, the runtime ones neither) and ``used_by`` (a setting the receiving Callback does not read is refused).
    Adding a setting: one ``_setting(...)`` here with its tier, help text and users; every list below follows.
    """

    # ---------------------------------------------------------------- what is protected (most users set these)
    target_modules: str | list[str] = _setting(
        factory=lambda: list(DEFAULT_TARGETS),
        tier="bases",
        lora_layer=True,
        help="module-name suffixes matched on '.' boundaries, or one regex string (re.fullmatch)",
    )
    channel_bound: float | None = _setting(
        0.05,
        tier="step",
        help="tau: keep each spectral-channel coordinate |delta_i| <= tau S_i after every step, so that "
        "||(W - W0) x|| <= tau ||W0 x|| for x in span(Q) (FORA needs mode='update'); None: unbounded. "
        "Default 0.05: results/demo_bounded",
    )
    freeze_other: bool = _setting(
        True, tier="step", help="freeze every parameter that is not a target weight (biases, norms, embeddings)"
    )
    subspaces: str | None = _setting(
        None, tier="runtime", help="a subspace file to load bases from when it exists, else to save them to"
    )
    subspaces_reuse: Literal["auto", "strict", "force"] = _setting(
        "auto",
        tier="runtime",
        help="stored bases (subspaces file, checkpoint, a previous fit) made with other basis settings or calibration "
        "data, or capturing less of the current calibration energy than they recorded: 'auto' re-estimates and "
        "overwrites the file (a checkpoint: refuses), 'strict' refuses, 'force' uses them anyway (with a warning)",
    )
    # ---------------------------------------------------------------- FORA (full fine-tuning) only
    mode: Mode = _setting(
        "update",
        tier="bases",
        used_by=FORA_ONLY,
        help="'update': project gradients and re-project weights after each step; 'gradient': gradients only",
    )
    project_gradients: bool = _setting(
        True,
        tier="step",
        used_by=FORA_ONLY,
        help="mode='update': True projects each gradient, grad <- Pi(grad), before the optimizer step as well as "
        "re-projecting W <- W0 + Pi(W - W0) after it; False (update-only, Adam-NSCL style) skips Pi(grad): half the "
        "projection flops, the same guarantee (the exact post-step re-projection keeps W - W0 in S), but the "
        "optimizer's moments see unprojected gradients (another trajectory). Only mode='update'; FORA-LoRA has no "
        "gradient projection",
    )
    precision: Literal["auto", "float32", "tf32", "bf16"] = _setting(
        "auto",
        tier="step",
        used_by=FORA_ONLY,
        help="GEMM arithmetic of the projections: 'float32' (exact), 'tf32', 'bf16' (cheap GEMMs only on small "
        "products), 'auto': the fastest of them whose leakage stays <= 1e-5 on this device (CUDA sm80+: tf32; CPU "
        "with bf16 GEMMs: bf16)",
    )
    reprojection: Literal["auto", "step", "anchors"] = _setting(
        "auto",
        tier="runtime",
        used_by=FORA_ONLY,
        help="mode='update', how W - W0 is kept in S after each optimizer step: 'step' takes the optimizer's step one "
        "layer at a time and projects each layer's step, W <- W_before + Pi(W - W_before) (no anchors: FORA keeps only "
        "the bases, the smaller of Q and its complement, and U, S, V; per-parameter optimizers only); 'anchors' "
        "re-projects W <- W0 + Pi(W - W0) from anchors W0 Q (d_out x k per layer) after the whole step; 'auto': "
        "'step' for float32/float64 weights, 'anchors' for bf16/fp16 ones (their per-step rounding would accumulate) "
        "or with offload_anchors. Both keep the same set: the same weights up to rounding",
    )
    offload_anchors: bool = _setting(
        False,
        tier="step",
        used_by=FORA_ONLY,
        help="reprojection='anchors' (chosen by 'auto' when this is set): keep the anchors W0 Q in host memory (pinned), copied to the device layer by layer at "
        "each re-projection, and store the complement basis where k > d_in/2: device memory is then the floor "
        "min(k, d_in - k) x d_in per input plus U, S, V. Costs one host-to-device copy of the anchors per step; "
        "on a CPU-only run it saves nothing",
    )
    extend_to: str | None = _setting(
        None,
        tier="runtime",
        used_by=FORA_ONLY,
        help="after fit, extend the subspaces with the task just learned and write them here",
    )
    # ---------------------------------------------------------------- FORA-LoRA only
    lora_rank: int | None = _setting(
        None,
        tier="step",
        used_by=LORA_ONLY,
        lora_layer=True,
        help="FORA-LoRA's LoRA rank (ForaLoRA: default 8; ForaModule: an int selects FORA-LoRA, None full fine-tuning)",
    )
    lora_alpha: float = _setting(
        16.0,
        tier="step",
        used_by=LORA_ONLY,
        lora_layer=True,
        help="FORA-LoRA scale numerator: the update is (alpha/rank) B A",
    )
    lora_dropout: float = _setting(0.0, tier="step", used_by=LORA_ONLY, help="FORA-LoRA dropout on the adapter's input")
    # ---------------------------------------------------------------- calibration (expert options)
    calibration_memory_gib: float | None = _setting(
        None,
        tier="runtime",
        help="most GiB the covariance sums (d_in^2 per distinct input) may take at once; beyond it the targets are "
        "calibrated in consecutive groups (one pass over the calibration data each, the same bases). None: a quarter "
        "of the device's free memory on CUDA, no limit on CPU",
        calibration=True,
    )
    calibration_generate: int = _setting(
        0,
        tier="bases",
        help="N > 0: extend each calibration prompt by the base model's own greedy continuation of up to N tokens "
        "(label-free, batched; the module's generate_continuations) before collecting covariances; 0: prompts as given",
        calibration=True,
    )
    capability_weights: dict[str, float] | None = _setting(
        None,
        tier="bases",
        help="name -> weight of each kept capability (default: equal)",
        calibration=True,
    )
    combine: Literal["covariance", "union"] = _setting(
        "covariance",
        tier="bases",
        help="several capabilities: 'covariance' (basis of the combined C) or 'union' (of per-capability bases)",
        calibration=True,
    )
    covariance_product: Literal["accumulator", "input"] = _setting(
        PRODUCT_DEFAULT,
        tier="bases",
        help="'input': each batch's X^T X runs in the activations' own dtype when they are bf16/fp16 (CUDA: float32 "
        "output; CPU: the batch's product is rounded to bf16/fp16 before the float32 sum); 'accumulator': the "
        "inputs are cast to covariance_dtype first",
        calibration=True,
    )
    covariance_dtype: Literal["float32", "float64"] = _setting(
        "float32",
        tier="runtime",
        help="dtype of the covariance accumulators (the same sums up to rounding)",
        calibration=True,
    )
    covariance_panel: int = _setting(
        PANEL_DEFAULT,
        tier="runtime",
        help="p > 0: accumulate only the upper block triangle of each batch's X^T X, in row panels p columns wide "
        "((b + 1)/(2b) of the flops for b = ceil(d_in/p) blocks), mirrored when the pass ends: the same sums up "
        "to float rounding; 0: the full product",
        calibration=True,
    )
    calibration_early_stop: bool = _setting(
        True,
        tier="runtime",
        help="end each calibration forward once every target has read its input (the later blocks and the lm_head "
        "feed no covariance: the same sums, less compute); one device and DDP only, full forward elsewhere "
        "(FSDP, DeepSpeed, foreign forward hooks) and for a target called twice per forward. False: always whole",
        calibration=True,
    )
    progress: bool = _setting(True, tier="runtime", help="show a progress bar during calibration (rank 0)")
    calibration_holdout: int = _setting(
        8,
        tier="runtime",
        help="n > 0: every n-th calibration batch of each capability (the 1st, n+1-th, ...) is summed apart to measure "
        "whether the data describes the capability (held-out energy share, docs/calibration.md; a FORA: warning "
        "when short), then added back (the bases use all data); costs one more d_in x d_in sum per input during "
        "the pass and one more eigh per input (two where the data is short). 0: no estimate",
        calibration=True,
    )
    calibration_samples: int | Literal["auto"] = _setting(
        0,
        tier="bases",
        help="n > 0: add n continuations of each calibration row sampled from the model itself (label-free, "
        "calibration_sample_tokens long) to the calibration data; 'auto': add 4 only when the held-out estimate "
        "says the data is short (a second calibration pass); 0: never",
        calibration=True,
    )
    calibration_sample_tokens: int = _setting(
        32,
        tier="bases",
        help="new tokens per sampled continuation (calibration_samples)",
        calibration=True,
    )
    on_violation: Literal["warn", "raise", "off"] = _setting(
        "warn",
        tier="runtime",
        help="what the leakage sentinel does when a protected layer's output on span(Q) moves past what the settings "
        "certify (checked every log_every_n_steps and at the end of fit, on a few probe rows): 'warn' once per "
        "fit naming the layer, the value, the bound and the likely causes; 'raise' stops the fit (ProtectionViolation); "
        "'off': no sentinel (no probe rows kept, nothing checked; the report says so)",
    )

    def __post_init__(self) -> None:
        self._normalize()
        hints = get_type_hints(type(self))
        for f in fields(self):
            if f.name not in _OWN_CHECKS:
                _check_type(f.name, getattr(self, f.name), hints[f.name])
        super().__post_init__()
        if not self.project_gradients and self.mode != "update":
            raise ValueError(
                f"project_gradients=False (update-only) needs mode='update', got mode={self.mode!r}: without the post-step "
                "re-projection nothing would keep W - W0 in S. Use mode='update', or project_gradients=True"
            )
        if self.offload_anchors and self.reprojection == "step":
            raise ValueError(
                "offload_anchors=True keeps anchors in host memory, but reprojection='step' keeps no anchors: "
                "use reprojection='anchors' (or 'auto') with offload_anchors, or drop offload_anchors"
            )
        if self.source != "activations":
            unread = [
                f.name for f in fields(self) if f.metadata.get("calibration") and getattr(self, f.name) != f.default
            ]
            if unread:
                raise ValueError(
                    f"FORA: {', '.join(unread)} only shape the calibration pass, but source={self.source!r} builds the "
                    "bases without calibration data: drop them, or use source='activations'"
                )
        _int_at_least("covariance_panel", self.covariance_panel, 0, "panel width in columns; 0: the full product")
        if self.calibration_memory_gib is not None and not self.calibration_memory_gib > 0:
            raise ValueError(
                f"calibration_memory_gib must be a number of GiB > 0 (or None: auto), got {self.calibration_memory_gib!r}"
            )
        if self.lora_rank is not None:
            _int_at_least("lora_rank", self.lora_rank, 1, "or None for full fine-tuning")
        _int_at_least("calibration_generate", self.calibration_generate, 0, "new tokens per calibration prompt; 0: off")
        _int_at_least("calibration_holdout", self.calibration_holdout, 0, "every n-th batch held out; 0: no estimate")
        if self.calibration_samples != "auto":
            _int_at_least("calibration_samples", self.calibration_samples, 0, "samples per row, or 'auto'; 0: off")
        _int_at_least("calibration_sample_tokens", self.calibration_sample_tokens, 1, "new tokens per sample")
        if self.channel_bound is not None:
            if isinstance(self.channel_bound, bool) or not isinstance(self.channel_bound, int | float):
                raise TypeError(
                    f"channel_bound must be a number tau >= 0 (or None: unbounded), got {self.channel_bound!r}"
                )
            if not 0.0 <= self.channel_bound < math.inf:
                raise ValueError(
                    f"channel_bound must be a finite tau >= 0 (0 freezes the channel; None: unbounded), got {self.channel_bound}"
                )
            self.channel_bound = float(self.channel_bound)
        if not 0.0 < self.lora_alpha < math.inf:
            raise ValueError(
                f"FORA: lora_alpha must be a finite number > 0 (the update is (alpha/rank) B A), got {self.lora_alpha}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.capability_weights is not None:
            bad = {k: w for k, w in self.capability_weights.items() if not 0.0 <= w < math.inf}
            if bad:
                raise ValueError(f"FORA: capability_weights must be finite and >= 0, got {bad}")

    def _normalize(self) -> None:
        """Accepted spellings to their stored form: a tuple of names to a list, paths to strings, mappings to dicts."""
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.rank, Mapping):
            self.rank = dict(self.rank)
        if isinstance(self.capability_weights, Mapping):
            self.capability_weights = dict(self.capability_weights)
        for name in ("subspaces", "extend_to"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON/YAML types (lists and dicts): what rebuilds this object (``ForaModule``'s record)."""
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The :data:`SAVED_SETTINGS` (tiers ``bases`` and ``step``) as plain types: what a checkpoint's callback state
        and a subspace file's header store with the bases (runtime settings are this run's business)."""
        values = self.to_dict()
        return {name: values[name] for name in SAVED_SETTINGS}

    def lora_layer_kwargs(self) -> dict[str, Any]:
        """The settings FORA-LoRA's layers are built with (:func:`~fora_lightning.lora.inject_fora_lora`'s keywords)."""
        return {name: getattr(self, name) for name in (*LORA_STRUCTURE, "lora_dropout")}

    def refuse_unused(self, user: str) -> None:
        """Raise naming every setting ``user`` ('FORA' or 'ForaLoRA') does not read that differs from its default.

        A setting given to a Callback that ignores it would be a silent no-op (``FORA(lora_rank=8)`` fine-tunes
        fully): each field's ``used_by`` metadata says who reads it.
        """
        unused = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if user not in f.metadata.get("used_by", BOTH) and getattr(self, f.name) != _default(f)
        ]
        if not unused:
            return
        if user == "ForaLoRA" and not self.project_gradients:
            raise ValueError(
                "ForaLoRA has no gradient projection to skip (its layer keeps the update feasible by construction, with no "
                "post-step re-projection): project_gradients=False applies to FORA only; remove it (or use FORA)"
            )
        other = "ForaLoRA" if user == "FORA" else "FORA"
        hint = (
            "they configure FORA-LoRA: use ForaLoRA(...) (or ForaModule(..., lora_rank=...)), or remove them"
            if user == "FORA"
            else "they configure FORA's per-step projection, which FORA-LoRA does not run (its layer keeps the update "
            "feasible by construction): remove them, or use FORA"
        )
        raise ValueError(f"FORA: {user} does not use {', '.join(unused)} (settings of {other} only): {hint}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ForaConfig:
        """A stored record back into settings (the inverse of :meth:`to_dict` / :meth:`record`). Lenient, as records
        are old: keys that are not settings (a checkpoint's ``class_path``, settings since removed) are ignored,
        missing ones take their defaults. A mapping a user writes goes through :meth:`resolve` (strict)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def resolve(cls, config: ForaConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> ForaConfig:
        """``config`` (a ForaConfig or a mapping of settings; ``None``: the defaults) with keyword ``overrides`` applied.

        An unknown keyword or mapping key raises ``TypeError`` naming the valid ones, as a constructor would; so
        does a value of the wrong type, from either.
        """
        names = {f.name for f in fields(cls)}
        given = dict(config) if isinstance(config, Mapping) else {}
        for where, keys in (("config=", given), ("keyword", overrides)):
            unknown = sorted(set(keys) - names)
            if unknown:
                raise TypeError(
                    f"unknown FORA setting(s) {unknown} ({where}); the settings are: {', '.join(sorted(names))}"
                )
        if config is not None and not isinstance(config, ForaConfig | Mapping):
            raise TypeError(f"FORA: config must be a ForaConfig or a mapping of settings, got {type(config).__name__}")
        base = config if isinstance(config, ForaConfig) else cls(**given)
        return replace(base, **overrides) if overrides else base


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


# checked by their own messages (SubspaceConfig's rank; ints with a lower bound; channel_bound) rather than by type
_OWN_CHECKS = frozenset({"rank", "channel_bound", "covariance_panel", "calibration_generate", "lora_rank"})


def _describe(hint: Any) -> str:
    """``hint`` in words: ``"True or False"``, ``"'a' or 'b'"``, ``"a number or None"``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        names = [repr(a) for a in args]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {args[0].__name__}" if args else "a list"
    if origin in (dict, Mapping):
        return f"a mapping {args[0].__name__} -> {args[1].__name__}" if args else "a mapping"
    return {bool: "True or False", int: "an int", float: "a number", str: "a string", type(None): "None"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Refuse a value that is not of the field's declared type (``energy="0.99"``, ``freeze_other="no"``).

    A mistyped choice is a ``ValueError`` (as an unknown choice), any other mismatch a ``TypeError``.
    """
    if _conforms(value, hint):
        return
    error = ValueError if get_origin(hint) is Literal and isinstance(value, str) else TypeError
    raise error(f"FORA: {name} must be {_describe(hint)}, got {value!r}")


def _int_at_least(name: str, value: Any, low: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({meaning}), got {value!r}")


def _tier(f: Field[Any]) -> Tier:
    tier = f.metadata.get("tier")
    if tier not in TIERS:
        raise TypeError(f"ForaConfig field '{f.name}' declares no tier in its metadata ({', '.join(TIERS)})")
    return tier


_FIELDS = fields(ForaConfig)
# settings that choose the bases (compared when stored bases are reused): from each field's tier
BASIS_SETTINGS: tuple[str, ...] = tuple(f.name for f in _FIELDS if _tier(f) == "bases")
# settings stored with the bases (checkpoint state, subspace-file header): bases and step tiers
SAVED_SETTINGS: tuple[str, ...] = tuple(f.name for f in _FIELDS if _tier(f) != "runtime")
RUNTIME_SETTINGS: tuple[str, ...] = tuple(f.name for f in _FIELDS if _tier(f) == "runtime")
# FORA-LoRA's own settings, and those that fix its layers' shapes and function (a checkpoint keeps its own)
LORA_SETTINGS: tuple[str, ...] = tuple(f.name for f in _FIELDS if f.metadata.get("used_by") == LORA_ONLY)
LORA_STRUCTURE: tuple[str, ...] = tuple(f.name for f in _FIELDS if f.metadata.get("lora_layer"))
