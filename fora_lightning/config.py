"""ForaConfig: every FORA setting, in one place (as PEFT's ``LoraConfig``).

One dataclass is read by the :class:`~fora_lightning.FORA` and :class:`~fora_lightning.ForaLoRA` Callbacks,
by :class:`~fora_lightning.ForaModule` (and so by LightningCLI, which shows each field with its help), and
written to the Callback's ``state_dict``, the subspace file's header and ``ForaModule`` checkpoints. The
fields that choose the bases come from :class:`~fora_lightning.core.subspace.SubspaceConfig` (the math's
own settings, no Lightning); this class adds those of the training glue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from fora_lightning.core.allocation import ALLOCATIONS, Allocation
from fora_lightning.core.subspace import SubspaceConfig
from fora_lightning.core.targets import DEFAULT_TARGETS

Mode = Literal["update", "gradient"]
# settings that change which bases are estimated or how the update is constrained (compared on reuse)
BASIS_SETTINGS = (
    "target_modules",
    "energy",
    "rank",
    "max_rank",
    "weight_rank",
    "source",
    "seed",
    "mode",
    "combine",
    "calibration_generate",
    "covariance_product",
    "covariance_token_stride",
    "allocation",
)
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout")


# the covariance pass's defaults: benchmarks/results/calibration_cost.md
PANEL_DEFAULT, PRODUCT_DEFAULT, STRIDE_DEFAULT = 512, "input", 1


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ForaConfig(SubspaceConfig):
    """FORA's settings. ``ForaConfig(energy=0.95, target_modules=["q_proj", "v_proj"])``.

    The basis fields (``energy``, ``rank``, ``max_rank``, ``weight_rank``, ``source``, ``seed``) are
    :class:`~fora_lightning.core.subspace.SubspaceConfig`'s; see there.
    """

    target_modules: str | list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata=_help("module-name suffixes matched on '.' boundaries, or one regex string (re.fullmatch)"),
    )
    mode: Mode = field(
        default="update",
        metadata=_help(
            "'update': project gradients and re-project weights after each step; 'gradient': gradients only"
        ),
    )
    project_gradients: bool = field(
        default=True,
        metadata=_help(
            "mode='update': True projects each gradient, grad <- Pi(grad), before the optimizer step as well as re-projecting "
            "W <- W0 + Pi(W - W0) after it; False (update-only, Adam-NSCL style) skips Pi(grad): half the projection flops, "
            "the same guarantee (the exact post-step re-projection keeps W - W0 in S), but the optimizer's moments see "
            "unprojected gradients (another trajectory). Only mode='update'; FORA-LoRA has no gradient projection"
        ),
    )
    precision: Literal["auto", "float32", "tf32", "bf16"] = field(
        default="auto",
        metadata=_help(
            "GEMM arithmetic of the projections: 'float32' (exact), 'tf32', 'bf16' (cheap GEMMs only on small products), "
            "'auto': the fastest of them whose leakage stays <= 1e-5 on this device (CUDA sm80+: tf32; CPU with bf16 GEMMs: bf16)"
        ),
    )
    offload_anchors: bool = field(
        default=False,
        metadata=_help(
            "mode='update': keep the anchors W0 Q in host memory (pinned), copied to the device layer by layer at each "
            "re-projection, and store the complement basis where k > d_in/2: device memory is then the floor "
            "min(k, d_in - k) x d_in per input plus U, S, V. Costs one host-to-device copy of the anchors per step; "
            "on a CPU-only run it saves nothing"
        ),
    )
    channel_bound: float | None = field(
        default=0.05,
        metadata=_help(
            "tau: keep each spectral-channel coordinate |delta_i| <= tau S_i after every step, so that "
            "||(W - W0) x|| <= tau ||W0 x|| for x in span(Q) (FORA needs mode='update'); None: unbounded. "
            "Default 0.05: results/demo_bounded"
        ),
    )
    freeze_other: bool = field(
        default=True, metadata=_help("freeze every parameter that is not a target weight (biases, norms, embeddings)")
    )
    subspaces: str | None = field(
        default=None, metadata=_help("a subspace file to load bases from when it exists, else to save them to")
    )
    subspaces_reuse: Literal["auto", "strict", "force"] = field(
        default="auto",
        metadata=_help(
            "stored bases (subspaces file, checkpoint) made with other basis settings or calibration data: 'auto' "
            "re-estimates and overwrites the file (a checkpoint: refuses), 'strict' refuses, 'force' uses them anyway"
        ),
    )
    allocation: Allocation = field(
        default="energy",
        metadata=_help(
            "how k is chosen per layer: 'energy' (each layer's own energy rule); 'trace' / 'output': the energy rule's "
            "total sum k water-filled over all layers by lambda_i / tr(C) ('output': times ||W0||_2^2 tr(C) / "
            "tr(W0 C W0^T)), core/allocation.py; source='activations' and no fixed rank only. Default 'energy': "
            "'trace' moves the demo along the front, not past it (results/plasticity)"
        ),
    )
    calibration_generate: int = field(
        default=0,
        metadata=_help(
            "N > 0: extend each calibration prompt by the base model's own greedy continuation of up to N tokens "
            "(label-free, batched; the module's generate_continuations) before collecting covariances; 0: prompts as given"
        ),
    )
    calibration_early_stop: bool = field(
        default=True,
        metadata=_help(
            "end each calibration forward once every target has read its input (the later blocks and the lm_head "
            "feed no covariance: the same sums, less compute); one device and DDP only, full forward elsewhere "
            "(FSDP, DeepSpeed, foreign forward hooks) and for a target called twice per forward. False: always whole"
        ),
    )
    covariance_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata=_help("dtype of the covariance accumulators")
    )
    covariance_panel: int = field(
        default=PANEL_DEFAULT,
        metadata=_help(
            "p > 0: accumulate only the upper block triangle of each batch's X^T X, in row panels p columns wide "
            "((b + 1)/(2b) of the flops for b = ceil(d_in/p) blocks), mirrored when the pass ends: the same sums up "
            "to float rounding; 0: the full product"
        ),
    )
    covariance_product: Literal["accumulator", "input"] = field(
        default=PRODUCT_DEFAULT,
        metadata=_help(
            "'input': each batch's X^T X runs in the activations' own dtype when they are bf16/fp16 (CUDA: float32 "
            "output; CPU: the batch's product is rounded to bf16/fp16 before the float32 sum); 'accumulator': the "
            "inputs are cast to covariance_dtype first"
        ),
    )
    covariance_token_stride: int = field(
        default=STRIDE_DEFAULT,
        metadata=_help(
            "s > 1: an input wider than its layer's output (d_in > d_out, e.g. down_proj's d_ff: its covariance "
            "costs more flops than the layer) counts every s-th non-padding token of each batch (offset: batch "
            "index mod s); 1: every token"
        ),
    )
    progress: bool = field(default=True, metadata=_help("show a progress bar during calibration (rank 0)"))
    capability_weights: dict[str, float] | None = field(
        default=None, metadata=_help("name -> weight of each kept capability (default: equal)")
    )
    combine: Literal["covariance", "union"] = field(
        default="covariance",
        metadata=_help(
            "several capabilities: 'covariance' (basis of the combined C) or 'union' (of per-capability bases)"
        ),
    )
    extend_to: str | None = field(
        default=None, metadata=_help("after fit, extend the subspaces with the task just learned and write them here")
    )
    lora_rank: int | None = field(
        default=None, metadata=_help("None: full fine-tuning (FORA); an int: FORA-LoRA with this LoRA rank")
    )
    lora_alpha: float = field(default=16.0, metadata=_help("FORA-LoRA scale numerator: the update is (alpha/rank) B A"))
    lora_dropout: float = field(default=0.0, metadata=_help("FORA-LoRA dropout on the adapter's input"))
    on_violation: Literal["warn", "raise"] = field(
        default="warn",
        metadata=_help(
            "what the leakage sentinel does when a protected layer's output on span(Q) moves past what the settings "
            "certify (checked every log_every_n_steps and at the end of fit, on a few probe rows): 'warn' once per "
            "fit naming the layer, the value, the bound and the likely causes; 'raise' stops the fit (ProtectionViolation)"
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (tuple, list)):
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be a list of names or one regex string, got {self.target_modules!r}")
        if isinstance(self.rank, Mapping):
            self.rank = dict(self.rank)
        if self.capability_weights is not None:
            self.capability_weights = dict(self.capability_weights)
        _choice("mode", self.mode, ("update", "gradient"))
        _bool("project_gradients", self.project_gradients)
        _bool("calibration_early_stop", self.calibration_early_stop)
        if not self.project_gradients and self.mode != "update":
            raise ValueError(
                f"project_gradients=False (update-only) needs mode='update', got mode={self.mode!r}: without the post-step "
                "re-projection nothing would keep W - W0 in S. Use mode='update', or project_gradients=True"
            )
        _choice("precision", self.precision, ("auto", "float32", "tf32", "bf16"))
        _choice("subspaces_reuse", self.subspaces_reuse, ("auto", "strict", "force"))
        _choice("covariance_dtype", self.covariance_dtype, ("float32", "float64"))
        _choice("combine", self.combine, ("covariance", "union"))
        _choice("covariance_product", self.covariance_product, ("accumulator", "input"))
        _int_at_least("covariance_panel", self.covariance_panel, 0, "panel width in columns; 0: the full product")
        _int_at_least("covariance_token_stride", self.covariance_token_stride, 1, "1: every token")
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("on_violation", self.on_violation, ("warn", "raise"))
        if self.allocation != "energy" and (self.rank is not None or self.source != "activations"):
            raise ValueError(
                f"allocation={self.allocation!r} spreads the energy rule's total k over layers; it needs "
                f"source='activations' and rank=None (got source={self.source!r}, rank={self.rank!r}): "
                "drop rank or set allocation='energy'"
            )
        for name in ("subspaces", "extend_to"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))
        if self.lora_rank is not None:
            _int_at_least("lora_rank", self.lora_rank, 1, "or None for full fine-tuning")
        _int_at_least("calibration_generate", self.calibration_generate, 0, "new tokens per calibration prompt; 0: off")
        if self.channel_bound is not None:
            if isinstance(self.channel_bound, bool) or not isinstance(self.channel_bound, (int, float)):
                raise TypeError(
                    f"channel_bound must be a number tau >= 0 (or None: unbounded), got {self.channel_bound!r}"
                )
            if not 0.0 <= self.channel_bound < float("inf"):
                raise ValueError(
                    f"channel_bound must be a finite tau >= 0 (0 freezes the channel; None: unbounded), got {self.channel_bound}"
                )
            self.channel_bound = float(self.channel_bound)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (lists and dicts), as stored in checkpoints and subspace files."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ForaConfig:
        """The inverse of :meth:`to_dict`; keys that are not settings (e.g. a checkpoint's ``class_path``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def resolve(cls, config: ForaConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> ForaConfig:
        """``config`` (a ForaConfig or its dict; ``None``: the defaults) with keyword ``overrides`` applied.

        An unknown keyword raises ``TypeError`` naming the valid ones, as a constructor would.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown FORA setting(s) {unknown}; the settings are: {', '.join(sorted(names))}")
        base = cls() if config is None else config if isinstance(config, ForaConfig) else cls.from_dict(config)
        return replace(base, **overrides) if overrides else base


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _int_at_least(name: str, value: Any, low: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({meaning}), got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        names = [repr(a) for a in allowed]
        raise ValueError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
