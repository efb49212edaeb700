"""Reuse decisions at fit start: a subspace file, bases kept from a previous ``fit``, a checkpoint's bases.

Each compares what the bases were made from (:mod:`~fora_lightning.reuse`: settings, calibration-data
fingerprints, weights) with this run, on rank 0, and broadcasts the decision (or the error) to every rank,
so nodes without a shared filesystem agree. ``subspaces_reuse`` ('auto' / 'strict' / 'force') sets the policy.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from fora_lightning.calibration import CalibrationSource, resolve_calibration
from fora_lightning.config import ForaConfig
from fora_lightning.core.covariance import Covariances
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.subspace_file import load_subspaces
from fora_lightning.reuse import (
    FLOOR,
    SLACK,
    TRAINED_FLOOR,
    TRAINED_SLACK,
    VERIFY_BATCHES,
    captured_shares,
    config_differences,
    data_differences,
    energy_mismatches,
    fingerprint_source,
    one_shot,
    weights_checksum,
)


class HeldBases(Protocol):
    """What the decisions read and reset of :class:`fora_lightning.protection.Protection` (no import of it: no cycle)."""

    config: ForaConfig
    calibration: CalibrationSource
    who: str
    anchors: bool
    reprojects: bool
    subspaces: dict[str, LayerSubspace]
    targets: dict[str, nn.Linear]
    capabilities: dict[str, dict[str, Any]]
    capability_energy: dict[str, dict[str, float]]
    chain: list[dict[str, Any]]
    _ended: dict[str, Any] | None
    _restored_config: dict[str, Any] | None

    @property
    def needs_q(self) -> bool: ...

    def calibrate(
        self, trainer: Trainer, pl_module: LightningModule, loader: Iterable[Any] | None = None
    ) -> Covariances: ...


def broadcast_decision(trainer: Trainer, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0 decides, every rank gets its answer (an error raised there is raised everywhere)."""
    payload: dict[str, Any] | None = None
    if trainer.is_global_zero:
        try:
            payload = decide()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            payload = {"error": e}
    payload = trainer.strategy.broadcast(payload, src=0)
    if "error" in payload:
        raise payload["error"]
    return payload


def fresh_source(p: HeldBases) -> bool:
    """Whether resolving the calibration makes new iterables each time (a factory or a ``calibration_dataloader()`` hook)."""
    return p.calibration is None or (callable(p.calibration) and not hasattr(p.calibration, "__iter__"))


def current_fingerprints(p: HeldBases, trainer: Trainer, pl_module: LightningModule) -> dict[str, str | None] | None:
    """The configured calibration data's fingerprints (one pass, no model); ``None`` when none is configured."""
    if p.config.source != "activations":
        return None
    try:
        source = resolve_calibration(p.calibration, trainer, pl_module)
    except ValueError:
        return None
    return fingerprint_source(source, fresh=fresh_source(p))


def forget(p: HeldBases) -> None:
    """Drop the bases and what was recorded with them (they will be re-estimated)."""
    p.subspaces, p.capabilities, p.chain, p.capability_energy = {}, {}, [], {}


def verify_captured(p: HeldBases, trainer: Trainer, pl_module: LightningModule, origin: str, trained: bool) -> bool:
    """Stored bases against the current calibration data: ``True`` keeps them, ``False`` re-estimates (or raises).

    For each capability, the share of the current calibration energy the bases capture on its first
    :data:`~fora_lightning.reuse.VERIFY_BATCHES` batches (one forward each, on every rank: a collective) is compared
    with the share recorded when they were made (``capability_energy``, saved in the file and the checkpoint). A clear
    shortfall (:func:`~fora_lightning.reuse.energy_mismatches`) means other data or another model: per
    ``subspaces_reuse``, 'auto' re-estimates with a ``FORA:`` warning, 'strict' refuses naming the layer and both
    shares, 'force' keeps them with a warning. ``trained``: bases the model has trained under (a checkpoint, a previous
    fit): its inputs drift legitimately, so only a gross shortfall counts (:data:`~fora_lightning.reuse.TRAINED_SLACK`)
    and 'auto' keeps them with a warning (a checkpoint cannot re-estimate: W0 is gone; the data fingerprint still
    refuses other data). A one-shot iterator passed as calibration
    cannot be read ahead without being used up: it is not checked ('strict' refuses, the others warn).
    """
    if p.config.source != "activations" or not p.capability_energy:
        return True
    try:
        source = resolve_calibration(p.calibration, trainer, pl_module)
    except ValueError:
        return True  # no calibration configured: nothing to check against (decide_file says so for a file)
    loaders = dict(source) if isinstance(source, Mapping) else {"default": source}
    policy = p.config.subspaces_reuse
    used_up = [name for name, loader in loaders.items() if one_shot(loader) and not fresh_source(p)]
    if used_up:
        message = (
            f"the calibration data of {used_up} is a one-shot iterator (a generator): {p.who} cannot read it ahead to "
            f"check the bases from {origin} against it without using it up. Pass a list of batches, a DataLoader, or "
            "a function returning a fresh iterator (calibration=lambda: make_batches())"
        )
        if policy == "strict":
            raise ValueError(f"FORA: {message}; subspaces_reuse='strict' refuses unchecked bases")
        rank_zero_warn(f"FORA: {message}; using them unchecked")
        return True
    found = []
    for cap, loader in loaders.items():
        recorded = {layer: shares[cap] for layer, shares in p.capability_energy.items() if cap in shares}
        if not recorded:
            continue
        batches = list(itertools.islice(loader, VERIFY_BATCHES))
        measured = captured_shares(p.subspaces, p.calibrate(trainer, pl_module, batches))
        rule = (TRAINED_SLACK, TRAINED_FLOOR) if trained else (SLACK, FLOOR)
        found += [(cap, *m) for m in energy_mismatches(recorded, measured, *rule)]
    if not found:
        return True
    listed = "; ".join(
        f"layer '{layer}' ('{cap}'): {now:.2%} of the current calibration energy, {then:.2%} when made"
        for cap, layer, then, now in found[:5]
    ) + (f"; {len(found) - 5} more" if len(found) > 5 else "")
    what = f"the {p.who} bases from {origin} capture less of this run's calibration data than they did of theirs ({listed})"
    if policy == "force":
        rank_zero_warn(f"FORA: {what}; keeping them (subspaces_reuse='force')")
        return True
    if policy == "strict":
        raise ValueError(
            f"FORA: {what}: other data or another model. subspaces_reuse='strict' refuses them: give the "
            "calibration data they were made with, set subspaces_reuse='auto' to re-estimate, or 'force' to keep them"
        )
    if trained:
        rank_zero_warn(
            f"FORA: {what}: other data, or a model that drifted far since (a resumed fit cannot re-estimate them: W0 "
            "is gone); keeping them. Resume with the calibration data they were made with; subspaces_reuse='strict' "
            "refuses instead"
        )
        return True
    rank_zero_warn(
        f"FORA: {what}: other data or another model; re-estimating them "
        "(subspaces_reuse='strict' refuses instead, 'force' keeps them)"
    )
    return False


def decide_file(p: HeldBases, trainer: Trainer, pl_module: LightningModule, path: Path) -> dict[str, Any]:
    """``{"load": (subspaces, meta) or None}``: load the file, or re-estimate (no file, or it differs under 'auto')."""
    if path.is_dir():
        raise IsADirectoryError(
            f"subspaces={str(path)!r} is a directory; give a file path such as {str(path / 'subspaces.safetensors')!r}"
        )
    if not path.is_file():
        return {"load": None}
    subspaces, meta = load_subspaces(path)
    policy = p.config.subspaces_reuse
    if policy == "force":
        return {"load": (subspaces, meta)}
    diffs = config_differences(meta.get("config"), p.config, compare_mode=p.reprojects)
    diffs += data_differences(meta.get("capabilities"), current_fingerprints(p, trainer, pl_module))
    if not diffs:
        return {"load": (subspaces, meta)}
    listed = "; ".join(diffs)
    if policy == "strict":
        raise ValueError(
            f"{path} was made with other settings or data than this run ({listed}); subspaces_reuse='strict' refuses it: "
            "set subspaces_reuse='auto' to re-estimate and overwrite it, 'force' to load it anyway, or give another subspaces= file"
        )
    if not can_estimate(p, trainer, pl_module):
        warnings.warn(
            f"FORA: {path} was made with other settings than this run ({listed}), and no calibration data is "
            "configured to re-estimate: loading it as is (give calibration=... to re-estimate)",
            stacklevel=2,
        )
        return {"load": (subspaces, meta)}
    warnings.warn(
        f"FORA: {path} was made with other settings or data than this run ({listed}): re-estimating and overwriting it "
        "(subspaces_reuse='strict' refuses instead, 'force' loads it anyway)",
        stacklevel=2,
    )
    return {"load": None}


def can_estimate(p: HeldBases, trainer: Trainer, pl_module: LightningModule) -> bool:
    """Calibration data is configured, or the source needs none."""
    if p.config.source != "activations":
        return True
    try:
        resolve_calibration(p.calibration, trainer, pl_module)
    except ValueError:
        return False
    return True


def drop_if_stale(p: HeldBases, trainer: Trainer, pl_module: LightningModule) -> None:
    """Bases kept from this object's previous fit: drop them when the model, its weights or the data changed."""
    ended = p._ended

    def decide() -> dict[str, Any]:
        reasons = []
        if id(next(iter(p.targets.values()))) != ended["model"]:
            reasons.append("this is another model")
        elif not torch.equal(weights_checksum(p.targets), ended["weights"]):
            reasons.append("the target weights changed since that fit ended")
        reasons += data_differences(p.capabilities, current_fingerprints(p, trainer, pl_module))
        return {"reasons": reasons}

    reasons = broadcast_decision(trainer, decide)["reasons"]
    if reasons:
        rank_zero_warn(f"FORA: {p.who} holds bases from a previous fit, but {'; '.join(reasons)}: re-estimating them")
        forget(p)
    p._ended = None


def check_resume(p: HeldBases, trainer: Trainer, pl_module: LightningModule) -> None:
    """A checkpoint's bases against this run's settings and data: refuse on a difference (``force``: warn)."""
    gradient_ckpt = (p._restored_config or {}).get("mode") == "gradient"
    if (p.anchors and any(s.anchor_q is None for s in p.subspaces.values())) or (p.reprojects and gradient_ckpt):
        raise ValueError(
            f"the checkpoint's {p.who} state has no anchors W0 Q, U_r^T W0 (it was trained with mode='gradient'), and "
            "W0 is not in it (its weights are W0 plus an update that left S), so mode='update' cannot keep W - W0 in S: resume with "
            "mode='gradient', or start a new fit from the checkpoint's weights without ckpt_path (they become W0)"
        )
    saved = p._restored_config

    def decide() -> dict[str, Any]:
        diffs = config_differences(saved, p.config, compare_mode=p.reprojects)
        return {"diffs": diffs + data_differences(p.capabilities, current_fingerprints(p, trainer, pl_module))}

    diffs = broadcast_decision(trainer, decide)["diffs"]
    if not diffs:
        return
    listed = "; ".join(diffs)
    if p.config.subspaces_reuse == "force":
        rank_zero_warn(
            f"FORA: resuming with the checkpoint's {p.who} bases although {listed} (subspaces_reuse='force')"
        )
        return
    raise ValueError(
        f"the checkpoint's {p.who} bases were made with other settings or data than this run ({listed}). A resumed fit "
        "cannot re-estimate them (W0 is gone): resume with the checkpoint's settings and calibration data, set "
        "subspaces_reuse='force' to keep its bases anyway, or start a new fit from its weights without ckpt_path"
    )
