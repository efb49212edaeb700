"""Choose the protected linear layers by name, as PEFT's ``target_modules`` does."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

TargetModules = str | Sequence[str]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama/Qwen/Mistral names
LORA_PARAMETERS = ("lora_A", "lora_B", "lora_delta")  # what a FORA-LoRA wrapper adds beside ``base_layer``


def name_matches(name: str, target_modules: TargetModules) -> bool:
    """A list matches name suffixes on ``.`` boundaries; a single string is a regex (``re.fullmatch``).

    ``"up_proj"`` matches ``model.layers.3.mlp.up_proj``; ``"1.mlp.up_proj"`` matches layer 1 but not 11.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose names match ``target_modules``, in model order.

    Raises ``ValueError`` when nothing matches (listing some available names) and ``TypeError``
    when a matched module is not an ``nn.Linear``.
    """
    if not isinstance(target_modules, str) and (not target_modules or isinstance(target_modules, bytes)):
        raise ValueError("target_modules is empty: give module-name suffixes (e.g. ['q_proj', 'up_proj']) or a regex")
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name or not name_matches(name, target_modules):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target module '{name}' is a {type(module).__name__}, not an nn.Linear; "
                "FORA protects linear layers only: narrow target_modules"
            )
        found[name] = module
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        regex = (
            f" A single string is a regular expression matched against the whole module name (re.fullmatch): "
            f"{target_modules!r} matches only a module named exactly so; give a list ([{target_modules!r}]) to match "
            f"name suffixes, or a pattern such as {'.*' + target_modules!r}."
            if isinstance(target_modules, str) else ""
        )
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}.{regex} "
            f"Linear layers available ({len(linears)}): {sample or 'none'}"
        )
    return found
