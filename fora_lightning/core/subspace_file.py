"""The subspace file: tensors in ``safetensors``, metadata as JSON in its header.

Keys are ``"<layer>::<field>"``; the header's ``fora`` entry holds the format version, the
layers' shapes, k, r and energy, and whatever the caller adds (model, capabilities, ...).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, safe_open
from torch import nn

from fora_lightning.core.subspace import LayerSubspace

FORMAT = "fora-subspaces"
VERSION = 1
_SEP = "::"
_TENSOR_FIELDS = {f.name for f in fields(LayerSubspace)} - {"d_out", "d_in", "k", "complement", "energy"}


def save_subspaces(path: str | Path, subspaces: Mapping[str, LayerSubspace], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``subspaces`` (anchors excluded: they belong to a fit, not to the capability)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    layers = {}
    for name, sub in subspaces.items():
        for field, t in sub.tensors().items():
            if field not in ("anchor_q", "anchor_u"):
                tensors[f"{name}{_SEP}{field}"] = t.detach().cpu().contiguous().clone()
        layers[name] = {"d_out": sub.d_out, "d_in": sub.d_in, "k": sub.k, "r": sub.r, "complement": sub.complement, "energy": sub.energy}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": layers,
        **dict(metadata or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"fora": json.dumps(header)})
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of a subspace file; refuses files of another format or a newer version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subspace file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("fora")
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a FORA subspace file (no 'fora' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(
            f"{path} was written by format version {meta['version']}; this fora-lightning reads up to version "
            f"{VERSION}: upgrade fora-lightning"
        )
    return meta


def load_subspaces(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, LayerSubspace], dict[str, Any]]:
    """Read a subspace file: (layer -> LayerSubspace, metadata)."""
    meta = read_metadata(path)
    flat = load_file(str(path), device=str(device))
    subspaces = {}
    for name, info in meta["layers"].items():
        t = {f: flat[f"{name}{_SEP}{f}"] for f in _TENSOR_FIELDS if f"{name}{_SEP}{f}" in flat}
        subspaces[name] = LayerSubspace(
            d_out=int(info["d_out"]), d_in=int(info["d_in"]), k=int(info["k"]), complement=bool(info["complement"]),
            energy=float(info["energy"]), **t,
        )
    return subspaces, meta


def validate_against(subspaces: Mapping[str, LayerSubspace], targets: Mapping[str, nn.Linear], source: str) -> None:
    """Raise ``ValueError`` naming every layer whose name or shape does not match the model's targets."""
    missing = sorted(set(targets) - set(subspaces))
    extra = sorted(set(subspaces) - set(targets))
    problems = []
    if missing:
        problems.append(f"no subspace for target layer(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"subspaces for layer(s) the model's targets do not include {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(set(targets) & set(subspaces)):
        w = targets[name].weight
        shape = (subspaces[name].d_out, subspaces[name].d_in)
        full = tuple(getattr(w, "shape", ()))
        if full != shape:
            problems.append(f"layer '{name}': subspace is for a {shape[0]}x{shape[1]} weight, the model's is {full[0]}x{full[1]}")
    if problems:
        raise ValueError(f"subspaces from {source} do not match the model: " + "; ".join(problems))
