"""Chained fine-tunes: add the capability just learned to a :class:`~fora_lightning.protection.Protection`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from fora_lightning.calibration import CalibrationSource, materialize
from fora_lightning.core.capabilities import GrownBasis, extend_subspace, grow_basis
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.subspace_file import now
from fora_lightning.core.targets import find_targets, weight_matrix
from fora_lightning.protection import Protection


def extend_protection(
    p: Protection,
    trainer: Trainer,
    pl_module: LightningModule,
    calibration: CalibrationSource = None,
    path: str | Path | None = None,
) -> dict[str, LayerSubspace]:
    """Chained fine-tunes: grow ``p``'s subspaces by the task just learned, GPM-style (see ``FORA.extend``).

    Each layer's Q grows by the top directions of ``(I - QQ^T) C (I - QQ^T)`` (C: the new task's covariance through
    the tuned model) until ``energy`` of C is held, capped by ``max_rank``; ``U_r, S_r, V_r`` and the anchors come from
    the tuned weights, the next fit's W0. Updates ``p`` in place and writes the merged file to ``path`` (rank 0)."""
    if not p.subspaces:
        raise ValueError(
            "FORA.extend needs the subspaces of the capabilities already kept: fit first, or give subspaces=FILE"
        )
    if p.config.source != "activations":
        raise ValueError(f"FORA.extend measures activations; source={p.config.source!r} has none to extend")
    p.unshard()  # a sharded fit's bases, whole again (the merged ones are whole; the next fit splits them)
    if calibration is None:
        calibration = (
            trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        )
    calibration = materialize(calibration)
    step = len(p.chain) + 1
    if not isinstance(calibration, Mapping):
        calibration = {f"task{step}": calibration}
    clash = [n for n in calibration if n in p.capabilities]
    if clash:
        raise ValueError(
            f"FORA.extend: capabilities {clash} are already protected ({list(p.capabilities)}); give new names"
        )
    p.targets = p.targets or find_targets(pl_module, p.config.target_modules)
    combined, per, info = p.calibrate_capabilities(trainer, pl_module, calibration, step)
    c = p.config
    merged: dict[str, LayerSubspace] = {}
    added: dict[str, int] = {}
    grown: dict[tuple[str, int], GrownBasis] = {}  # layers reading one input with one basis tensor grow it once
    for name, sub in p.subspaces.items():
        weight = p.targets[name].weight.detach()
        weight = weight_matrix(p.targets[name], weight.full_tensor() if hasattr(weight, "full_tensor") else weight)
        if tuple(weight.shape) != (sub.d_out, sub.d_in):
            raise ValueError(
                f"FORA.extend: layer '{name}' holds a {tuple(weight.shape)} shard, not its full weight; extend on one process"
            )
        cov, key = combined.covariance(name), (combined.owner[name], sub.basis.data_ptr())
        if key not in grown:
            grown[key] = grow_basis(sub, cov, c.energy, c.max_rank, allow_complement=not p.needs_q)
        merged[name], added[name] = extend_subspace(
            sub, weight, cov, c.energy, c.weight_rank, c.max_rank, grown=grown[key]
        )
        if p.anchors:
            merged[name].attach_anchors(weight, on_host=p.anchors_on_host)
    p.subspaces = merged
    p.capabilities = {**p.capabilities, **info}
    p.record_energy(merged, per)
    p.chain.append({"step": step, "capabilities": list(per), "method": "gpm", "created": now()})
    rank_zero_info(f"FORA.extend: {list(per)} added {sum(added.values())} directions over {len(added)} layers")
    if path is not None and trainer.is_global_zero:
        p.save(Path(path), pl_module)
        rank_zero_info(f"FORA: extended subspaces saved to {path}")
    return merged
