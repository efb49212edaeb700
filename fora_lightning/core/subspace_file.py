"""The subspace file: tensors in ``safetensors``, metadata as JSON in its header.

Tensor keys are ``"<layer>::<field>"`` (basis, u, s, v, spectrum). The header's ``fora`` entry
(format version 2) holds::

    format, version, created (UTC date), writer (fora-lightning version)
    model        {name, config (HF config without run-time keys) or null, architecture_sha256, n_parameters}
    layers       {name: {d_out, d_in, k, r, complement, energy, nbytes, capability_energy {cap: fraction}}}
    capabilities {name: {tokens, weight, fingerprint, step}}   (token counts, sha256 of the calibration samples)
    chain        [{step, capabilities, method, created}]         (one entry per estimate / extend)
    config, combine, ...                                         (whatever the caller adds)

Version 1 files (layers and config only) are read; the model check is then skipped with a warning.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from fora_lightning.core.covariance import attention_mask_of
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.targets import LORA_PARAMETERS

FORMAT = "fora-subspaces"
VERSION = 2
MIN_VERSION = 1
_SEP = "::"
_TENSOR_FIELDS = {f.name for f in fields(LayerSubspace)} - {
    "d_out",
    "d_in",
    "k",
    "complement",
    "energy",
    "anchors_on_host",
    "split",
}
_SAVED_FIELDS = _TENSOR_FIELDS - {"anchor_q", "anchor_u", "anchor_basis", "delta"}  # a file holds bases, not a run
# HF config entries that describe a run, not the function the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "architectures",
    "auto_map",
}


def _writer_version() -> str:
    try:
        from importlib.metadata import version

        return version("fora-lightning")
    except Exception:  # not installed (a source checkout)
        return "unknown"


def now() -> str:
    """The UTC time as ISO 8601 seconds, as the file records dates."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- identity
def _hf_config(model: nn.Module) -> Any:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and callable(getattr(cfg, "to_dict", None)) and hasattr(cfg, "model_type"):
            return cfg
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What the file records about the model: name, structural HF config, and a hash of its parameter shapes.

    ``architecture_sha256`` is sha256 over ``"name:shape"`` of every parameter in order (weights
    themselves are not hashed: a tuned checkpoint of the same architecture matches). FORA-LoRA
    wrappers are transparent: ``<layer>.base_layer.<p>`` counts as ``<layer>.<p>`` and the ``lora_*``
    parameters are skipped, so a file written by ``FORA`` validates under ``ForaLoRA`` and back.
    """
    cfg = _hf_config(model)
    config = None
    name = type(model).__name__
    if cfg is not None:
        raw = cfg.to_dict()
        name = str(raw.get("_name_or_path") or raw.get("name_or_path") or raw.get("model_type") or name)
        config = _jsonable({k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS and "dropout" not in k})
    h = hashlib.sha256()
    n = 0
    for pname, p in model.named_parameters():
        if pname.rpartition(".")[2] in LORA_PARAMETERS:
            continue
        h.update(f"{pname.replace('.base_layer.', '.')}:{tuple(p.shape)};".encode())
        n += 1
    return {"name": name, "config": config, "architecture_sha256": h.hexdigest(), "n_parameters": n}


# ---------------------------------------------------------------------------------------------- fingerprint
def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(f"K{key}".encode())
            _hash_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _hash_into(h, item)
    else:
        h.update(f"O{obj!r}".encode())


FINGERPRINT_SCHEME = "sha256-samples"


def _columns(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a batch: tensors, and lists of plain values (a column of strings) kept whole."""
    if isinstance(obj, Mapping):
        return [c for key in sorted(obj, key=str) for c in _columns(obj[key], f"{path}/{key}")]
    if isinstance(obj, list | tuple) and any(isinstance(v, Tensor | Mapping | list | tuple) for v in obj):
        return [c for i, v in enumerate(obj) for c in _columns(v, f"{path}/{i}")]
    return [(path, obj)]


def sample_digests(batch: Any) -> list[str]:
    """sha256 of each sample of ``batch``, so that a digest over samples ignores how they were grouped into batches.

    A sample is row ``i`` of every tensor whose leading size is the batch size ``B`` (the first tensor's), and item
    ``i`` of every list of ``B`` plain values; where the batch has a padding mask
    (:func:`~fora_lightning.core.covariance.attention_mask_of`), each such row keeps only its unmasked positions (a
    sample padded to another length in another batch hashes the same). Anything else (a scalar, a tensor of
    another leading size) is hashed into every sample. A batch with no tensor and not a list is one sample.
    """
    columns = _columns(batch)
    sizes = [leaf.shape[0] for _, leaf in columns if isinstance(leaf, Tensor) and leaf.dim() >= 1]
    if sizes:
        size = sizes[0]
    elif isinstance(batch, list | tuple):
        size = len(batch)
    else:
        size = 1
        columns = [("", [batch])]
    mask = attention_mask_of(batch)
    keep = mask.detach().cpu() != 0 if mask is not None else None
    columns = [(path, leaf.detach().cpu() if isinstance(leaf, Tensor) else leaf) for path, leaf in columns]
    out = []
    for i in range(size):
        h = hashlib.sha256()
        for path, leaf in columns:
            h.update(f"P{path}".encode())
            if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == size:
                row = leaf[i]
                if keep is not None and tuple(leaf.shape[: keep.dim()]) == tuple(keep.shape):
                    row = row[keep[i]]
                _hash_into(h, row)
            elif isinstance(leaf, list | tuple) and len(leaf) == size:
                _hash_into(h, leaf[i])
            else:
                _hash_into(h, leaf)
        out.append(h.hexdigest())
    return out


def digest_of(samples: Iterable[str]) -> str:
    """The data fingerprint: ``"sha256-samples:"`` + sha256 over the sorted per-sample digests (a multiset)."""
    return f"{FINGERPRINT_SCHEME}:" + hashlib.sha256("".join(sorted(samples)).encode()).hexdigest()


class FingerprintedBatches:
    """Yields ``batches`` unchanged while hashing their samples; ``digest`` is :func:`digest_of` the last complete pass.

    Independent of batch order and of how samples are grouped into batches (a ``shuffle=True`` loader, another
    ``batch_size``, dynamic padding: :func:`sample_digests`). Tensors are hashed by dtype, shape and bytes.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self._samples: list[str] = []

    def __iter__(self) -> Iterator[Any]:
        samples = []
        for batch in self.batches:
            samples += sample_digests(batch)
            yield batch
        self._samples = samples  # only a complete pass counts (a caller may stop early, e.g. to peek one batch)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    @property
    def digest(self) -> str:
        return digest_of(self._samples)

    @property
    def rows(self) -> tuple[int, int]:
        """``(samples, distinct samples)`` of the last complete pass."""
        return len(self._samples), len(set(self._samples))


# ---------------------------------------------------------------------------------------------- write / read
def save_subspaces(
    path: str | Path,
    subspaces: Mapping[str, LayerSubspace],
    metadata: Mapping[str, Any] | None = None,
    layer_metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``subspaces`` (anchors excluded: they belong to a fit, not to the capability), atomically.

    ``metadata`` entries (model, capabilities, chain, config, ...) go to the header's top level;
    ``layer_metadata[name]`` is merged into that layer's entry (e.g. ``capability_energy``).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"subspace file {path} is a directory; give a file path such as {path / 'subspaces.safetensors'}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    layers = {}
    for name, sub in subspaces.items():
        for field, t in sub.tensors().items():
            if field in _SAVED_FIELDS:
                tensors[f"{name}{_SEP}{field}"] = t.detach().cpu().contiguous().clone()
        layers[name] = {
            "d_out": sub.d_out,
            "d_in": sub.d_in,
            "k": sub.k,
            "r": sub.r,
            "complement": sub.complement,
            "energy": None if math.isnan(sub.energy) else sub.energy,
            "nbytes": sub.nbytes(),
            **_jsonable(dict((layer_metadata or {}).get(name, {}))),
        }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "created": now(),
        "writer": _writer_version(),
        "layers": layers,
        **_jsonable(dict(metadata or {})),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"fora": json.dumps(header)})
    tmp.replace(path)
    return path


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """Fill what a version-1 header lacks (``model``/``capabilities``/``chain``), recording ``upgraded_from``."""
    version = int(meta["version"])
    if version < VERSION:
        meta.setdefault("model", None)
        meta.setdefault("capabilities", {})
        meta.setdefault("chain", [])
        meta["upgraded_from"] = version
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of a subspace file (version 1 upgraded in memory).

    Refuses a file that is not a FORA subspace file, and a format version this code cannot read,
    saying which version it would need.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subspace file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fora")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a FORA subspace file (no 'fora' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int):
        raise ValueError(
            f"{path}: format version {version!r} is not an integer; this fora-lightning reads versions {MIN_VERSION}-{VERSION}"
        )
    if version > VERSION:
        raise ValueError(
            f"{path} was written in subspace-file format version {version}; this fora-lightning ({_writer_version()}) "
            f"reads versions {MIN_VERSION}-{VERSION}: reading it needs a fora-lightning that supports format version "
            f"{version} (upgrade fora-lightning)"
        )
    if version < MIN_VERSION:
        raise ValueError(
            f"{path} was written in subspace-file format version {version}, which this fora-lightning no longer "
            f"reads (it needs format version {MIN_VERSION}-{VERSION}): re-estimate the subspaces (delete the file and refit)"
        )
    return _upgrade(meta)


def _expected_shapes(info: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    d_out, d_in, k, r = (int(info[key]) for key in ("d_out", "d_in", "k", "r"))
    return {"basis": (d_in, d_in - k if info["complement"] else k), "u": (d_out, r), "s": (r,), "v": (d_in, r)}


def load_subspaces(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, LayerSubspace], dict[str, Any]]:
    """Read a subspace file: ``(layer -> LayerSubspace, metadata)``.

    Checks the file against itself: every layer's header entry has its tensors, with the shapes
    its ``d_out, d_in, k, r, complement`` imply, and k, r within the weight's shape; the tensors are
    finite, ``basis``, ``u``, ``v`` orthonormal and ``s`` descending (``ValueError`` naming the file,
    layer and values).
    """
    meta = read_metadata(path)
    flat = load_file(str(path), device=str(device))
    subspaces = {}
    problems = []
    bases: dict[tuple, list[Tensor]] = {}
    for name, info in meta["layers"].items():
        d_out, d_in, k, r = (int(info[key]) for key in ("d_out", "d_in", "k", "r"))
        t = {f: flat.pop(f"{name}{_SEP}{f}") for f in _SAVED_FIELDS if f"{name}{_SEP}{f}" in flat}
        if not (0 <= k <= d_in and 0 <= r <= min(d_out, d_in)):
            problems.append(f"layer '{name}': k={k}, r={r} do not fit a {d_out}x{d_in} weight")
            continue
        for field, shape in _expected_shapes(info).items():
            if field not in t:
                problems.append(f"layer '{name}': tensor '{name}{_SEP}{field}' is missing")
            elif tuple(t[field].shape) != shape:
                problems.append(f"layer '{name}': '{field}' is {tuple(t[field].shape)}, the header implies {shape}")
        if problems:
            continue
        problems += _value_problems(name, t)
        if problems:
            continue
        t["basis"] = _shared(t["basis"], bases)  # q/k/v (gate/up) stored one copy each: held as one again
        energy = info.get("energy")
        subspaces[name] = LayerSubspace(
            d_out=d_out,
            d_in=d_in,
            k=k,
            complement=bool(info["complement"]),
            energy=float("nan") if energy is None else float(energy),
            **t,
        )
    if flat:
        problems.append(f"tensors for no layer in the header: {sorted(flat)[:5]}")
    if problems:
        raise ValueError(f"{path} is inconsistent: " + "; ".join(problems))
    return subspaces, meta


def _shared(t: Tensor, seen: dict[tuple, list[Tensor]]) -> Tensor:
    """``t``, or an equal tensor loaded before it (the file stores a basis shared by layers once per layer)."""
    key = (tuple(t.shape), t.dtype)
    for other in seen.setdefault(key, []):
        if torch.equal(other, t):
            return other
    seen[key].append(t)
    return t


def _orthonormality_error(m: Tensor, probes: int = 4) -> float:
    """``max ||M^T M z - z|| / ||z||`` over a few Gaussian ``z`` (0 for orthonormal columns; costs ``4 d k``)."""
    if m.shape[1] == 0:
        return 0.0
    z = torch.randn(m.shape[1], probes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m64 = m.double()
    return float(((m64.T @ (m64 @ z) - z).norm(dim=0) / z.norm(dim=0)).max())


def _value_problems(name: str, t: Mapping[str, Tensor]) -> list[str]:
    """Finite tensors, orthonormal ``basis``/``u``/``v`` columns, ``s`` non-negative and descending."""
    bad = [f for f in sorted(t) if not torch.isfinite(t[f]).all()]
    if bad:
        return [f"layer '{name}': {bad} hold NaN or inf"]
    out = []
    for field in ("basis", "u", "v"):
        tol = 1e-3 if t[field].dtype in (torch.float32, torch.float64) else 5e-2
        err = _orthonormality_error(t[field])
        if err > tol:
            out.append(f"layer '{name}': '{field}' columns are not orthonormal (|M^T M - I| ~ {err:.3g})")
    s = t["s"].double()
    if (s < 0).any() or (s[1:] > s[:-1] * (1 + 1e-6) + 1e-12).any():
        out.append(f"layer '{name}': singular values 's' are not non-negative and descending ({s[:4].tolist()} ...)")
    return out


# ---------------------------------------------------------------------------------------------- validation
def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}={saved[k]!r} in the file, {current[k]!r} here"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
    ]


def validate_against(
    subspaces: Mapping[str, LayerSubspace],
    targets: Mapping[str, nn.Linear],
    source: str,
    metadata: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    capabilities: Sequence[str] | None = None,
) -> None:
    """Raise ``ValueError`` listing every mismatch between the subspaces and the model.

    Always: layer names (missing / extra) and weight shapes. With ``metadata`` and ``model``
    (:func:`model_identity` of the model now): the HF config entries both record, else the
    architecture hash. With ``capabilities`` (names the caller was configured with): each must be
    among those the file protects. A version-1 file has no model record: that check is skipped
    with a warning.
    """
    missing = [n for n in targets if n not in subspaces]
    extra = [n for n in subspaces if n not in targets]
    problems = []
    if missing:
        problems.append(f"no subspace for target layer(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(
            f"subspaces for layer(s) the model's targets do not include {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    for name in [n for n in targets if n in subspaces]:
        w = targets[name].weight
        shape = (subspaces[name].d_out, subspaces[name].d_in)
        full = tuple(getattr(w, "shape", ()))
        if full != shape:
            problems.append(
                f"layer '{name}': subspace is for a {shape[0]}x{shape[1]} weight, the model's is {'x'.join(map(str, full))}"
            )
    if metadata is not None and model is not None:
        saved = metadata.get("model")
        if saved is None:
            warnings.warn(
                f"{source} was written in format version {metadata.get('upgraded_from', metadata.get('version'))}, which "
                "records no model: only layer names and shapes were checked",
                stacklevel=2,
            )
        elif saved.get("config") is not None and model.get("config") is not None:
            diff = _config_differences(saved["config"], model["config"])
            if diff:
                problems.append(
                    f"model config differs from '{saved.get('name')}' the file was computed on: " + ", ".join(diff[:8])
                )
        elif saved.get("architecture_sha256") != model.get("architecture_sha256"):
            problems.append(
                f"model architecture differs: the file was computed on '{saved.get('name')}' "
                f"({saved.get('n_parameters')} parameter tensors, sha256 {str(saved.get('architecture_sha256'))[:12]}), "
                f"this is '{model.get('name')}' ({model.get('n_parameters')}, sha256 {str(model.get('architecture_sha256'))[:12]})"
            )
    if metadata is not None and capabilities is not None:
        saved_caps = list(metadata.get("capabilities") or {})
        absent = [c for c in capabilities if c not in saved_caps]
        if saved_caps and absent:
            problems.append(
                f"FORA was configured to keep capabilities {list(capabilities)}, the file protects {saved_caps} (not {absent})"
            )
    if problems:
        raise ValueError(f"subspaces from {source} do not match the model: " + "; ".join(problems))
