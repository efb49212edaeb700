r"""Export FORA-LoRA as a plain LoRA adapter in the Hugging Face PEFT layout.

Each layer's whole update is one LoRA of rank ``r_lora + r``:

.. math::

    A' = \begin{bmatrix} A P_Q \\ V_r^T \end{bmatrix},\qquad
    B' = \begin{bmatrix} \tfrac{\alpha}{r_{lora}} P_U B & U_r \operatorname{diag}(\delta) \end{bmatrix},\qquad
    B' A' = W - W_0 .

The scaling is folded into ``B'``, so the adapter is written with ``lora_alpha = r`` (PEFT's scaling
``lora_alpha / r = 1``). Layers whose ``r_lora + r`` is below the largest one are zero-padded to it
(zero rows of ``A'``, zero columns of ``B'``: the product is unchanged), so one ``r`` fits all layers.
``A'``/``B'`` are the same for a GPT-2 ``Conv1D`` base (PEFT's ``lora_A`` is ``r x d_in`` there too); its
weight is stored transposed, which PEFT's ``fan_in_fan_out: true`` says (it only matters when merging).

Other trained parameters (``freeze_other=False``: biases, norms, a head) are part of the fine-tune: each module that
holds one is written whole as PEFT's ``modules_to_save`` (keys ``base_model.model.<module>.<param>``, what PEFT's
own ``save_pretrained`` writes), so the adapter reproduces the trained model. A trained parameter PEFT cannot carry
(held by a module that also holds FORA-LoRA layers, or by the wrapped base layer) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fora_lightning.core.targets import LORA_PARAMETERS, is_transposed, name_matches
from fora_lightning.lora.model import fora_lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STALE_NAMES = ("adapter_model.bin",)  # PEFT's other weights file: it would lie beside ours, describing another adapter


@torch.no_grad()
def export_lora_adapter(
    module: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT LoRA layout) to ``directory``.

    ``module`` is the trained model holding FORA-LoRA layers: a Hugging Face ``PreTrainedModel`` or any
    module containing one (e.g. a LightningModule); layer names are written relative to that model, with
    PEFT's keys ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``. Without a Hugging Face
    model inside, names are relative to ``module``. ``base_model_name_or_path`` and ``task_type`` default
    to the model's ``config._name_or_path`` and, for ``*ForCausalLM`` classes, ``"CAUSAL_LM"``.
    Load with ``PeftModel.from_pretrained(base_model, directory)``. Returns ``directory``.

    Trained parameters besides the LoRA factors (``requires_grad`` after the fit: ``freeze_other=False``) go in as
    ``modules_to_save`` (see the module docstring). The two files replace those of an earlier export atomically; a
    directory that holds another adapter's weights (``adapter_model.bin``) is refused rather than left inconsistent.
    """
    layers = fora_lora_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no FORA-LoRA layers: nothing to export")
    out = Path(directory)
    stale = [n for n in STALE_NAMES if (out / n).exists()]
    if stale:
        raise ValueError(
            f"FORA: export_lora_adapter: {out} already holds {stale}, another adapter's weights that would lie beside "
            f"the {WEIGHTS_NAME} written now (PEFT reads one, a reader may take the other): remove them or export to "
            "an empty directory"
        )
    root, prefix = _hf_root(module, list(layers))
    saved_modules = _modules_to_save(root, layers, prefix)
    factors = {}
    for name, layer in layers.items():
        b, a = layer.factors()
        factors[name[len(prefix) :]] = (b.detach().float().cpu(), a.detach().float().cpu())
    rank = max(a.shape[0] for _, a in factors.values())
    tensors = {}
    for name, (b, a) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    for name in saved_modules:
        for pname, p in root.get_submodule(name).named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = p.detach().cpu().contiguous().clone()
    dropouts = {float(getattr(layer.lora_dropout, "p", 0.0)) for layer in layers.values()}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _task_type(root),
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(root, "config", None), "_name_or_path", None)
        or None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": dropouts.pop() if len(dropouts) == 1 else 0.0,
        "target_modules": _target_modules(root, list(factors)),
        "bias": "none",
        "fan_in_fan_out": all(
            is_transposed(layer.base_layer) for layer in layers.values()
        ),  # Conv1D: W stored d_in x d_out
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved_modules or None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        "fora": json.dumps(
            {
                name: {"lora_rank": lay.lora_rank, "weight_rank": lay.weight_rank, "k": lay.k}
                for name, lay in layers.items()
            }
        ),
    }
    weights_tmp, config_tmp = out / (WEIGHTS_NAME + ".tmp"), out / (CONFIG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata=meta)
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights_tmp.replace(out / WEIGHTS_NAME)
    config_tmp.replace(out / CONFIG_NAME)
    return out


def _modules_to_save(root: nn.Module, layers: dict[str, nn.Module], prefix: str) -> list[str]:
    """Names (relative to ``root``) of the modules holding trained parameters other than the FORA-LoRA factors.

    A parameter is trained when it has ``requires_grad`` (FORA-LoRA freezes all others with ``freeze_other=True``).
    Each is assigned to the module that owns it directly; that module is saved whole. Refused (``ValueError`` naming
    the parameters): a trained parameter of a wrapped base layer, or of a module that also holds FORA-LoRA layers.
    """
    lora = {id(getattr(layer, p)) for layer in layers.values() for p in LORA_PARAMETERS}
    wrapped = [n[len(prefix) :] for n in layers]
    owners: dict[str, None] = {}
    refused = []
    for mname, sub in root.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in lora:
                continue
            full = f"{mname}.{pname}" if mname else pname
            inside = [
                w for w in wrapped if mname == w or mname.startswith(w + ".") or not mname or w.startswith(mname + ".")
            ]
            if inside:
                refused.append(full)
            else:
                owners.setdefault(mname)
    if refused:
        raise ValueError(
            f"FORA: export_lora_adapter: trained parameters {refused[:5]}{' ...' if len(refused) > 5 else ''} cannot go "
            "in a PEFT adapter (they belong to a FORA-LoRA layer's base or to a module around FORA-LoRA layers, which "
            "PEFT's modules_to_save cannot wrap). Freeze them before training (freeze_other=True), or merge_lora(model) "
            "and save the merged model instead"
        )
    return sorted({_outermost(n, owners) for n in owners})


def _outermost(name: str, names: dict[str, None]) -> str:
    """``name``, or the shortest of ``names`` that contains it (a saved module carries its submodules)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in names:
            return ".".join(parts[:i])
    return name


def _hf_root(module: nn.Module, names: list[str]) -> tuple[nn.Module, str]:
    """The Hugging Face ``PreTrainedModel`` (``module`` itself or its shallowest submodule) holding every
    layer, and its name prefix (``""`` or ``"path."``); ``(module, "")`` when there is none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return module, ""
    for path, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            prefix = f"{path}." if path else ""
            outside = [n for n in names if not n.startswith(prefix)]
            if outside:
                raise ValueError(
                    f"FORA-LoRA layers {outside[:5]} lie outside the Hugging Face model '{path}': export one model at a time"
                )
            return sub, prefix
    return module, ""


def _task_type(root: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(root).__name__.endswith("ForCausalLM") else None


def _target_modules(root: nn.Module, names: list[str]) -> list[str]:
    """The last name components (e.g. ``["q_proj", "v_proj"]``) when, matched as PEFT does, they select
    exactly ``names`` in ``root``; otherwise the full names."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    inside = tuple(n + "." for n in names)
    selected = {n for n, _ in root.named_modules() if n and not n.startswith(inside) and name_matches(n, suffixes)}
    return suffixes if selected == set(names) else sorted(names)
