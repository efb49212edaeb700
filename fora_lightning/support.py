"""What FORA refuses at setup, by name, instead of running unprotected.

- DeepSpeed strategies: ZeRO partitions (stage 2/3) or fuses (stage 1, its own optimizer step) the gradients
  and weights outside the parameters' ``.grad``/``.data`` that :class:`~fora_lightning.layout.TargetLayout`
  projects, so the projection would silently see nothing; FORA-LoRA reads ``W0`` for its SVD, which stage 3
  partitions away, and is untested under the others. Use DDP, FSDP1 or FSDP2 (``ModelParallelStrategy``).
- Quantized linears (bitsandbytes ``Linear4bit``/``Linear8bitLt``, torchao tensor-subclass weights) as
  full-FORA targets: their weight is packed integers, not a float matrix ``W`` with a gradient to project.
  Use FORA-LoRA (``lora_rank=...``) over a float base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fora_lightning.core.targets import quantization_of


def is_deepspeed(strategy: Any) -> bool:
    """``isinstance(strategy, DeepSpeedStrategy)`` (Lightning's class imports without deepspeed installed);
    also any class named ``DeepSpeed*Strategy`` in its MRO (e.g. Fabric's or a fork's)."""
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - Lightning always ships the class
        DeepSpeedStrategy = ()  # noqa: N806
    if DeepSpeedStrategy and isinstance(strategy, DeepSpeedStrategy):
        return True
    return any(c.__name__.startswith("DeepSpeed") and c.__name__.endswith("Strategy") for c in type(strategy).__mro__)


def refuse_unsupported_strategy(trainer: Any, who: str) -> None:
    """Raise ``RuntimeError`` naming the strategy when it is DeepSpeed (FORA and FORA-LoRA alike)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and is_deepspeed(strategy):
        stage = getattr(strategy, "config", None) or {}
        zero = stage.get("zero_optimization", {}).get("stage") if isinstance(stage, Mapping) else None
        raise RuntimeError(
            f"{who} does not support {type(strategy).__name__}{f' (ZeRO stage {zero})' if zero is not None else ''}: "
            "DeepSpeed keeps the gradients and weights in its own partitioned buffers, where FORA's projection (and "
            "FORA-LoRA's reading of W0) never sees them, so training would run unprotected. "
            "Use strategy='ddp', 'fsdp' or ModelParallelStrategy (FSDP2)"
        )


def refuse_quantized_targets(targets: Mapping[str, nn.Module], who: str) -> None:
    """Raise ``TypeError`` naming every quantized target layer (full fine-tuning projects a float weight)."""
    bad = {n: why for n, m in targets.items() if (why := quantization_of(m)) is not None}
    if bad:
        listed = "; ".join(f"'{n}' is {why}" for n, why in list(bad.items())[:3])
        raise TypeError(
            f"{who} (full fine-tuning) cannot protect quantized layers: {listed}{' ...' if len(bad) > 3 else ''} "
            f"({len(bad)} in all). Their weights are packed integers with no float gradient to project. Load the model "
            "in float32/bfloat16, or narrow target_modules to the float layers"
        )
