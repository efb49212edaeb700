"""The methods a comparison runs: their names, labels and markers, the Callback each name means, and back.

============================  ==============================================================================
``fora``                      :class:`~fora_lightning.FORA` (``source="activations"``), full fine-tuning
``plain_ft``                  :class:`~fora_lightning.baselines.TrainTargetsOnly`: the same weights, unconstrained
``lora``                      plain LoRA = :class:`~fora_lightning.ForaLoRA` with no bases (k = 0, r = 0)
``l2sp`` / ``ewc``            :class:`~fora_lightning.baselines.l2sp.L2SP`, :class:`~fora_lightning.baselines.ewc.EWC`
``weight_projection``         FORA with ``source="weights"`` (top right singular vectors of W0), FORA's k per layer
``random``                    FORA with ``source="random"`` (a random k-frame), FORA's k per layer
``fora_lora``                 :class:`~fora_lightning.ForaLoRA`
``peft_lora``                 PEFT's own LoRA (:class:`~experiments.peft_methods.PeftLoRA`)
``osf``                       PEFT's OSF, effective rank = FORA's k per layer by default (``PeftOSF``)
``corda_kpm``                 PEFT's CorDA, knowledge-preserved mode, on FORA's calibration data (``PeftCorDA``)
============================  ==============================================================================

:func:`build_callback` turns a name into its Callback; :func:`~fora_lightning.llm.report.method_of` (the
library's, re-exported here) names the method of a Callback, so reports label runs the way the comparison does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback

from experiments.peft_methods import PeftCorDA, PeftLoRA, PeftOSF
from fora_lightning.baselines.ewc import EWC
from fora_lightning.baselines.l2sp import L2SP
from fora_lightning.baselines.targets_only import TrainTargetsOnly
from fora_lightning.callback import FORA
from fora_lightning.llm.report import PLAIN_LORA, method_of, trainer_method
from fora_lightning.lora import ForaLoRA

__all__ = ["DISPLAY_ORDER", "LABELS", "MARKERS", "METHODS", "PEERS", "build_callback", "method_of", "trainer_method"]

METHODS = (
    "fora",
    "plain_ft",
    "lora",
    "l2sp",
    "ewc",
    "weight_projection",
    "random",
    "fora_lora",
    "peft_lora",
    "osf",
    "corda_kpm",
)
DISPLAY_ORDER = (
    "plain_ft",
    "lora",
    "peft_lora",
    "l2sp",
    "ewc",
    "weight_projection",
    "random",
    "osf",
    "corda_kpm",
    "fora",
    "fora_lora",
)
LABELS = {
    "plain_ft": "plain fine-tuning",
    "lora": "LoRA",
    "l2sp": "L2-SP",
    "ewc": "EWC",
    "weight_projection": "weight-space projection (matched k)",
    "random": "random subspace (matched k)",
    "fora": "FORA",
    "fora_lora": "FORA-LoRA",
    "peft_lora": "PEFT LoRA",
    "osf": "PEFT OSF",
    "corda_kpm": "PEFT CorDA-KPM",
}
MARKERS = {
    "plain_ft": "o",
    "lora": "s",
    "l2sp": "^",
    "ewc": "v",
    "weight_projection": "D",
    "random": "X",
    "fora": "*",
    "fora_lora": "P",
    "peft_lora": "h",
    "osf": "<",
    "corda_kpm": ">",
}
PEERS = {"peft_lora": PeftLoRA, "osf": PeftOSF, "corda_kpm": PeftCorDA}


def build_callback(
    name: str, args: dict[str, Any], targets: list[str] | str, fora_ks: Mapping[str, int] | None
) -> Callback:
    """The Callback that makes plain ``CausalLMModule`` training into method ``name``."""
    args = {"target_modules": targets, **args}
    if name in ("fora", "weight_projection", "random", "fora_lora"):
        args.setdefault("progress", False)
    if name == "plain_ft":
        return TrainTargetsOnly(**args)
    if name == "l2sp":
        return L2SP(**args)
    if name == "ewc":
        return EWC(**{"progress": False, **args})
    if name == "fora":
        return FORA(**args)
    if name == "fora_lora":
        return ForaLoRA(**args)
    if name == "osf":
        return PeftOSF(**{**args, "fora_ks": fora_ks})
    if name in PEERS:
        return PEERS[name](**args)
    if name == "lora":  # plain LoRA: FORA-LoRA with an empty protected input span (k = 0) and no channel (r = 0)
        return ForaLoRA(**{**args, **PLAIN_LORA})
    if fora_ks is None:
        raise ValueError(f"{name} needs FORA's per-layer k: run 'fora' first")
    source = "weights" if name == "weight_projection" else "random"
    return FORA(**{**args, "source": source, "rank": dict(fora_ks)})
