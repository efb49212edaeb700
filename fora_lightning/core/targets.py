"""Choose the protected linear layers by name, as PEFT's ``target_modules`` does, and read their weights.

Two weight layouts are targets: ``nn.Linear`` (``W`` stored ``d_out x d_in``, ``y = x W^T + b``) and
transformers' ``Conv1D`` of the GPT-2 family (stored ``d_in x d_out``, ``y = x W + b``). ``core/`` does not
import transformers, so a ``Conv1D`` is recognised by duck typing (:func:`is_transposed`: a class named
``Conv1D`` with an int ``nf``, the number of outputs); every FORA formula then reads the weight through
:func:`weight_matrix`, the ``d_out x d_in`` view (``W.T`` for ``Conv1D``, whose writes go through).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

TargetModules = str | Sequence[str]
DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)  # Llama/Qwen/Mistral names
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2 Conv1D names: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
LORA_PARAMETERS = ("lora_A", "lora_B", "lora_delta")  # what a FORA-LoRA wrapper adds beside ``base_layer``
_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "QuantLinear", "FP8Linear")


def name_matches(name: str, target_modules: TargetModules) -> bool:
    """A list matches name suffixes on ``.`` boundaries; a single string is a regex (``re.fullmatch``).

    ``"up_proj"`` matches ``model.layers.3.mlp.up_proj``; ``"1.mlp.up_proj"`` matches layer 1 but not 11.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight ``d_in x d_out`` (transformers' ``Conv1D``: class name and an int ``nf``)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


def is_target_layer(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def weight_matrix(module: nn.Module, t: Tensor | None = None) -> Tensor:
    """``t`` (default ``module.weight``; or its ``.grad``, ``.data``) as the ``d_out x d_in`` matrix ``W``:
    ``t`` itself for ``nn.Linear``, the view ``t.T`` for ``Conv1D`` (in-place writes reach the parameter)."""
    t = module.weight if t is None else t
    return t.T if is_transposed(module) else t


def dense_weight(module: nn.Module) -> Tensor:
    """``W0`` as a detached float ``d_out x d_in`` matrix, whatever the storage, for everything that reads the base weight.

    bitsandbytes 4-bit (``Params4bit``, a ``quant_state``): ``dequantize_4bit(weight.data, quant_state)``;
    8-bit (``Int8Params``, row scales ``SCB``): ``W0 = CB * SCB / 127`` (``int8_vectorwise_dequant``);
    bitsandbytes is imported only then (a weight its CPU eval forward repacked, ``packing_format_for_cpu``, is unpacked
    on copies first). Otherwise :func:`weight_matrix` (``W^T`` of a ``Conv1D``), detached.
    """
    w = module.weight
    state, scb = getattr(w, "quant_state", None), _int8_scales(module)
    if state is not None:
        from bitsandbytes import functional

        data = w.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU eval forward: unpack copies
            data, state = functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return functional.dequantize_4bit(data, state).detach()
    if scb is not None:
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(w.data, scb).detach()
    return weight_matrix(module).detach()


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a bitsandbytes 4-bit/8-bit tensor that :func:`dense_weight` dequantizes."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or _int8_scales(module) is not None


def _int8_scales(module: nn.Module) -> Tensor | None:
    """An int8 weight's row scales ``SCB``: on the ``Int8Params``, or (after a ``Linear8bitLt`` forward) on its ``state``."""
    w = getattr(module, "weight", None)
    scb = getattr(w, "SCB", None)
    if scb is None and isinstance(w, Tensor) and w.dtype == torch.int8:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def features(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a target layer, from its attributes (valid when the weight is a flat FSDP shard)."""
    if is_transposed(module):
        nx = getattr(module, "nx", None)
        return module.nf, int(nx) if isinstance(nx, int) else int(module.weight.shape[0])
    return module.out_features, module.in_features


def quantization_of(module: nn.Module) -> str | None:
    """Why ``module``'s weight is not a plain float tensor FORA can project, or ``None``.

    Duck-typed (no bitsandbytes/torchao import): a bitsandbytes-style class name (``Linear4bit``,
    ``Linear8bitLt``, ...), a weight with a ``quant_state`` or ``SCB`` (bitsandbytes ``Params4bit``/``Int8Params``),
    a non-floating weight dtype, or a tensor-subclass weight (torchao's ``AffineQuantizedTensor``, float8, NF4).
    """
    cls = type(module).__name__
    if cls in _QUANTIZED_CLASSES:
        return f"a {cls}"
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return None
    if getattr(w, "quant_state", None) is not None or getattr(w, "SCB", None) is not None:
        return f"a {cls} whose weight is a quantized {type(w).__name__}"
    if not w.dtype.is_floating_point:
        return f"a {cls} whose weight has dtype {w.dtype}"
    data = w.data if isinstance(w, nn.Parameter) else w
    if type(data) is not Tensor and type(data).__name__ != "DTensor":
        return f"a {cls} whose weight is a {type(data).__name__} tensor subclass (torchao-style quantization)"
    return None


def resolve_target_modules(model: nn.Module, target_modules: TargetModules) -> TargetModules:
    """``target_modules``, or :data:`GPT2_TARGETS` when it is the Llama default, matches nothing in ``model``,
    and ``model`` holds ``Conv1D`` layers named ``c_attn``/``c_fc``/``c_proj`` (a GPT-2-family model)."""
    if isinstance(target_modules, str) or tuple(target_modules) != DEFAULT_TARGETS:
        return target_modules
    names = [(n, m) for n, m in model.named_modules() if n]
    if any(name_matches(n, target_modules) for n, _ in names):
        return target_modules
    if any(is_transposed(m) and name_matches(n, GPT2_TARGETS) for n, m in names):
        return list(GPT2_TARGETS)
    return target_modules


def find_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Module]:
    """The ``nn.Linear``/``Conv1D`` modules of ``model`` whose names match ``target_modules``, in model order
    (the default list falls back to the GPT-2 names, :func:`resolve_target_modules`).

    Raises ``ValueError`` when nothing matches (listing some available names) and ``TypeError``
    when a matched module is neither.
    """
    if not isinstance(target_modules, str) and (not target_modules or isinstance(target_modules, bytes)):
        raise ValueError(
            "no target name patterns (an empty list): give module-name suffixes (e.g. ['q_proj', 'up_proj']) or a regex"
        )
    target_modules = resolve_target_modules(model, target_modules)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not name_matches(name, target_modules):
            continue
        if not is_target_layer(module):
            raise TypeError(
                f"target module '{name}' is a {type(module).__name__}, not an nn.Linear or a transformers Conv1D; "
                "FORA protects linear layers only: narrow the target name patterns to linear layers"
            )
        found[name] = module
    if not found:
        linears = [n for n, m in model.named_modules() if is_target_layer(m)]
        sample = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        regex = (
            f" A single string is a regular expression matched against the whole module name (re.fullmatch): "
            f"{target_modules!r} matches only a module named exactly so; give a list ([{target_modules!r}]) to match "
            f"name suffixes, or a pattern such as {'.*' + target_modules!r}."
            if isinstance(target_modules, str)
            else ""
        )
        raise ValueError(
            f"target name patterns {target_modules!r} matched no module of {type(model).__name__}.{regex} "
            f"Linear layers available ({len(linears)}): {sample or 'none'}"
        )
    return found
