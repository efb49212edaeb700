"""Inject FORA-LoRA layers by ``target_modules`` name patterns, freeze the rest, count what trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fora_lightning.core.targets import (
    LORA_PARAMETERS,
    TargetModules,
    find_targets,
    is_quantized,
    is_target_layer,
    name_matches,
    quantization_of,
    resolve_target_modules,
)
from fora_lightning.lora.layer import ForaLoraLinear


def fora_lora_layers(model: nn.Module) -> dict[str, ForaLoraLinear]:
    """The :class:`ForaLoraLinear` modules of ``model`` by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ForaLoraLinear)}


def inject_fora_lora(
    model: nn.Module,
    target_modules: TargetModules,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    weight_rank: int = 8,
) -> dict[str, ForaLoraLinear]:
    """Replace each ``nn.Linear`` (or GPT-2 ``Conv1D``) matched by ``target_modules`` (as :func:`core.targets.find_targets`) by a
    :class:`ForaLoraLinear` wrapping it, in place; returns the wrappers by name (the replaced modules' names).

    A quantized bitsandbytes base (``Linear4bit``/``Linear8bitLt``, QLoRA) is wrapped as is: its own forward stays the
    frozen ``W0 x``, the bases read the dequantized weight (:func:`core.targets.dense_weight`).

    Idempotent: a model that already holds FORA-LoRA layers is returned as is when the patterns select
    exactly those layers and the LoRA settings agree; otherwise ``ValueError`` names the difference.
    """
    existing = fora_lora_layers(model)
    if existing:
        _check_existing(model, existing, target_modules, lora_rank, lora_alpha, weight_rank)
        return existing
    targets = find_targets(model, target_modules)
    unreadable = {n: why for n, m in targets.items() if not is_quantized(m) and (why := quantization_of(m)) is not None}
    if unreadable:
        name, why = next(iter(unreadable.items()))
        raise TypeError(
            f"FORA-LoRA cannot read the base weight W0 of '{name}': it is {why} ({len(unreadable)} such target(s)). "
            "QLoRA is supported over bitsandbytes Linear4bit/Linear8bitLt layers whose weight is already quantized "
            "(a Params4bit with a quant_state, an Int8Params with SCB: move the model to its device first, bitsandbytes "
            "quantizes on .to/.cuda); other quantization formats (torchao, ...): load the base in bfloat16/float32"
        )
    seen: dict[int, str] = {}
    for name, linear in targets.items():
        if id(linear) in seen:
            raise ValueError(
                f"layers '{seen[id(linear)]}' and '{name}' are the same nn.Linear (shared weight); FORA-LoRA wraps each once"
            )
        seen[id(linear)] = name
    wrappers: dict[str, ForaLoraLinear] = {}
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = ForaLoraLinear(linear, lora_rank, lora_alpha, lora_dropout, weight_rank, name=name)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def _check_existing(
    model: nn.Module,
    existing: dict[str, ForaLoraLinear],
    target_modules: TargetModules,
    lora_rank: int,
    lora_alpha: float,
    weight_rank: int,
) -> None:
    inside = tuple(n + "." for n in existing)
    target_modules = resolve_target_modules(model, target_modules)
    matched = {
        n
        for n, m in model.named_modules()
        if n
        and (is_target_layer(m) or isinstance(m, ForaLoraLinear))
        and name_matches(n, target_modules)
        and not n.startswith(inside)
    }
    if matched != set(existing):
        raise ValueError(
            f"the model already holds FORA-LoRA layers {sorted(existing)[:5]}, but target_modules={target_modules!r} "
            f"selects {sorted(matched)[:5]}: inject once, with all targets"
        )
    for name, layer in existing.items():
        r = min(weight_rank, layer.out_features, layer.in_features)
        if (layer.lora_rank, layer.lora_alpha, layer.weight_rank) != (lora_rank, float(lora_alpha), r):
            raise ValueError(
                f"FORA-LoRA layer '{name}' has lora_rank={layer.lora_rank}, lora_alpha={layer.lora_alpha:g}, "
                f"weight_rank={layer.weight_rank}; asked for {lora_rank}, {lora_alpha:g}, {r}"
            )


def mark_only_lora_trainable(model: nn.Module, freeze_other: bool = True) -> None:
    """``requires_grad`` on: every FORA-LoRA layer's ``lora_A``, ``lora_B``, ``lora_delta``; off: the wrapped
    base weights and biases, and (``freeze_other``) every other parameter of ``model``."""
    lora = {id(getattr(m, p)) for m in fora_lora_layers(model).values() for p in LORA_PARAMETERS}
    base = {id(p) for m in fora_lora_layers(model).values() for p in m.base_layer.parameters()}
    for p in model.parameters():
        if id(p) in lora:
            p.requires_grad_(True)
        elif id(p) in base or freeze_other:
            p.requires_grad_(False)


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a model: ``trainable`` of ``total`` (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Count trainable and all parameters of ``model`` (as PEFT's ``print_trainable_parameters``)."""
    params = list(model.parameters())
    return TrainableSummary(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
