"""Stored bases against the current run: what differs between a subspace file, a checkpoint or a previous fit
and the settings, calibration data and model of this one.

Three places hold bases made earlier: a subspace file (``subspaces=``), a checkpoint's callback state,
and a FORA object's own state after a ``fit``. Each records the :class:`~fora_lightning.ForaConfig` it was
made with and a fingerprint of each capability's calibration batches; the helpers here list every
difference (``"energy=0.9 there, 0.5 here"``) so the caller can re-estimate, refuse, or warn.

The data fingerprint of the current run is taken by iterating the configured calibration ``DataLoader``
once, *without the model* (:func:`fingerprint_source`): one pass of data loading, no forward, against the
forwards and eigendecompositions a re-estimate costs (computing it during calibration instead would
spend that very cost to learn whether it was needed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fora_lightning.config import BASIS_SETTINGS, ForaConfig
from fora_lightning.core.distributed import local_tensor
from fora_lightning.core.subspace_file import FingerprintedBatches


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def config_differences(saved: Mapping[str, Any] | None, config: ForaConfig, compare_mode: bool = True) -> list[str]:
    """``"name=saved there, current here"`` for every :data:`~fora_lightning.config.BASIS_SETTINGS` entry that differs.

    ``seed`` counts only for ``source='random'``; ``mode`` only when ``compare_mode`` (FORA-LoRA ignores it).
    """
    if not saved:
        return []
    current = _plain(config.to_dict())
    names = [n for n in BASIS_SETTINGS if compare_mode or n != "mode"]
    if "random" not in (saved.get("source"), current.get("source")):
        names.remove("seed")
    return [
        f"{n}={saved[n]!r} there, {current[n]!r} here" for n in names if n in saved and _plain(saved[n]) != current[n]
    ]


def fingerprint_source(source: Any) -> dict[str, str | None]:
    """Capability name -> sha256 of its calibration batches (a lone loader is ``"default"``), from one data pass.

    Only a ``DataLoader`` is read (it starts a fresh pass on every ``iter``); any other iterable may be
    single-pass (a generator) and is not touched: its digest is ``None`` (not compared).
    """
    loaders = dict(source) if isinstance(source, Mapping) else {"default": source}
    digests: dict[str, str | None] = {}
    for name, loader in loaders.items():
        if not isinstance(loader, DataLoader):
            digests[name] = None
            continue
        batches = FingerprintedBatches(loader)
        for _ in batches:
            pass
        digests[name] = batches.digest
    return digests


def data_differences(
    saved: Mapping[str, Mapping[str, Any]] | None, current: Mapping[str, str | None] | None
) -> list[str]:
    """What differs between the stored capabilities' fingerprints and those of the configured calibration data."""
    if not saved or current is None:
        return []
    out = []
    for name, digest in current.items():
        if name not in saved:
            out.append(f"calibration capability '{name}' is not among those there ({sorted(saved)})")
        elif digest is not None and saved[name].get("fingerprint") not in (None, digest):
            out.append(
                f"calibration data of '{name}' differs (fingerprint {str(saved[name]['fingerprint'])[7:19]} there, {digest[7:19]} here)"
            )
    return out


def weights_checksum(targets: Mapping[str, nn.Linear]) -> Tensor:
    """Per target ``[sum w, sum w^2, sum w * ramp]`` in float64 on CPU (this rank's shard): a change detector.

    A weight not held here (an FSDP1 flat-parameter view outside forward) gives NaN, which equals nothing.
    """
    rows = []
    for module in targets.values():
        w = local_tensor(module.weight.detach())
        if w.untyped_storage().nbytes() < (w.storage_offset() + w.numel()) * w.element_size():
            rows.append(
                torch.full((3,), float("nan"), dtype=torch.float64)
            )  # an FSDP1 view whose storage is freed: never "unchanged"
            continue
        w = w.reshape(-1).double()
        ramp = torch.linspace(-1.0, 1.0, w.numel(), dtype=w.dtype, device=w.device)
        rows.append(torch.stack([w.sum(), w.square().sum(), (w * ramp).sum()]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
