"""Reuse decisions at fit start: a subspace file, bases kept from a previous ``fit``, a checkpoint's bases.

Each compares what the bases were made from (:mod:`~fora_lightning.reuse`: settings, calibration-data
fingerprints, weights) with this run, on rank 0, and broadcasts the decision (or the error) to every rank,
so nodes without a shared filesystem agree. ``subspaces_reuse`` ('auto' / 'strict' / 'force') sets the policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from fora_lightning.calibration import resolve_calibration
from fora_lightning.core.subspace_file import load_subspaces
from fora_lightning.reuse import config_differences, data_differences, fingerprint_source, weights_checksum

if TYPE_CHECKING:
    from fora_lightning.protection import Protection


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


def current_fingerprints(p: Protection, trainer: Trainer, pl_module: LightningModule) -> dict[str, str | None] | None:
    """The configured calibration data's fingerprints (one pass, no model); ``None`` when none is configured."""
    if p.config.source != "activations":
        return None
    try:
        source = resolve_calibration(p.calibration, trainer, pl_module)
    except ValueError:
        return None
    return fingerprint_source(source)


def decide_file(p: Protection, trainer: Trainer, pl_module: LightningModule, path: Path) -> dict[str, Any]:
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
    if p.needs_q and any(s.complement for s in subspaces.values()) and not any(d.startswith("mode=") for d in diffs):
        diffs.append("the file stores complement bases (gradient mode or FORA-LoRA), mode='update' needs Q itself")
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


def can_estimate(p: Protection, trainer: Trainer, pl_module: LightningModule) -> bool:
    """Calibration data is configured, or the source needs none."""
    if p.config.source != "activations":
        return True
    try:
        resolve_calibration(p.calibration, trainer, pl_module)
    except ValueError:
        return False
    return True


def drop_if_stale(p: Protection, trainer: Trainer, pl_module: LightningModule) -> None:
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
        p.subspaces, p.capabilities, p.chain, p.capability_energy = {}, {}, [], {}
    p._ended = None


def check_resume(p: Protection, trainer: Trainer, pl_module: LightningModule) -> None:
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
