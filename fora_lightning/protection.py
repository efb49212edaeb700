"""Protection: what FORA and FORA-LoRA share, the protected subspaces of one model and how they are obtained.

Target selection, calibration, estimation (eigendecompositions spread over ranks), the subspace file, the
capability bookkeeping and the state that goes into checkpoints. The two Callbacks each hold one
:class:`Protection` and differ only in what they do with the bases: :class:`~fora_lightning.FORA` projects
gradients and weights, :class:`~fora_lightning.ForaLoRA` puts them into its layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from fora_lightning.calibration import COVARIANCE_DTYPES, CalibrationSource, calibrate, resolve_calibration
from fora_lightning.config import ForaConfig
from fora_lightning.core.allocation import allocate_from_covariances
from fora_lightning.core.capabilities import capability_weights, combine_covariances, union_spectra
from fora_lightning.core.covariance import Covariances
from fora_lightning.core.distributed import spread_spectra
from fora_lightning.core.energy import captured_energy
from fora_lightning.core.subspace import LayerSubspace, estimate_subspaces, format_summary
from fora_lightning.core.subspace_file import (
    FingerprintedBatches,
    model_identity,
    now,
    save_subspaces,
    validate_against,
)
from fora_lightning.core.targets import find_targets
from fora_lightning.layout import TargetLayout
from fora_lightning.monitor import ProtectionMonitor
from fora_lightning.reuse import weights_checksum
from fora_lightning.reuse_decisions import broadcast_decision, check_resume, decide_file, drop_if_stale
from fora_lightning.safety import warn_extreme_ranks
from fora_lightning.support import refuse_quantized_targets
from fora_lightning.targeting import select_targets


class Protection:
    """The protected subspaces of one model under one :class:`~fora_lightning.ForaConfig`.

    ``anchors``: the bases must be Q itself with anchors ``W0 Q``, ``U_r^T W0`` attached (FORA's update
    mode); otherwise a complement basis is allowed where it is smaller (gradient mode, FORA-LoRA).
    ``who`` names the owner in log lines and errors; ``bounds_channel``: the owner enforces ``config.channel_bound``.
    """

    def __init__(
        self, config: ForaConfig, calibration: CalibrationSource, anchors: bool, who: str, bounds_channel: bool = True
    ) -> None:
        self.config = config
        self.bounds_channel = (
            bounds_channel  # whether the owner enforces config.channel_bound (FORA: mode='update' only)
        )
        self.calibration = calibration
        self.anchors = anchors
        self.who = who
        self.subspaces: dict[str, LayerSubspace] = {}
        self.targets: dict[str, nn.Linear] = {}
        self.layout: TargetLayout | None = None  # how the target weights are held (whole, FSDP2 rows, FSDP1 units)
        self.capabilities: dict[str, dict[str, Any]] = {}  # name -> tokens, weight, fingerprint, step
        self.capability_energy: dict[str, dict[str, float]] = {}  # layer -> capability -> tr(Q^T C_c Q) / tr(C_c)
        self.chain: list[dict[str, Any]] = []
        self._capability_covariances: dict[str, Covariances] = {}
        self._restored = False  # subspaces came from a checkpoint in this fit (checked against the settings in prepare)
        self._restored_config: dict[str, Any] | None = None
        self._ended: dict[str, Any] | None = None  # the model and weights the last fit ended with
        self.monitor = ProtectionMonitor(who, self)  # the leakage sentinel and fora_report.{json,md}

    @property
    def path(self) -> Path | None:
        return Path(self.config.subspaces) if self.config.subspaces is not None else None

    # ------------------------------------------------------------------ targets
    def select(self, pl_module: nn.Module, keep: Iterable[nn.Module] = ()) -> dict[str, nn.Module]:
        """Find the targets and (``freeze_other``) freeze every other parameter but ``keep`` (another FORA's targets)."""
        self.targets = select_targets(pl_module, self.config.target_modules, self.config.freeze_other, self.who, keep)
        refuse_quantized_targets(self.targets, self.who)
        return self.targets

    def find(self, pl_module: nn.Module) -> None:
        """Look the targets up again when the model no longer holds the selected modules (FSDP1 rewraps)."""
        present = {id(m) for m in pl_module.modules()}
        if not self.targets or any(id(m) not in present for m in self.targets.values()):
            self.targets = find_targets(pl_module, self.config.target_modules)

    def bind(self, trainer: Trainer) -> TargetLayout:
        """Bind the targets to how the strategy holds them (whole, FSDP2 row shards, FSDP1 flat units)."""
        self.layout = TargetLayout(self.targets, trainer.strategy.model)
        return self.layout

    # ------------------------------------------------------------------ obtaining the bases
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bases from (in order) this object's restored state, the subspace file, or calibration; then on the device.

        Bases held from a previous ``fit`` are dropped (re-estimated, with a warning) when the model, its
        weights or the calibration data changed; restored ones are checked against the current settings.
        """
        layout = self.bind(trainer)
        restored, self._restored = self._restored, False
        if self.subspaces and not restored and self._ended is not None:
            drop_if_stale(self, trainer, pl_module)
        if self.subspaces:
            validate_against(self.subspaces, layout.shape_targets(), "the checkpoint")
            if restored:
                check_resume(self, trainer, pl_module)
            self.to(pl_module.device)
            if self.anchors:
                layout.localize_anchors(self.subspaces)
            origin = "restored from the checkpoint" if restored else "kept"
            rank_zero_info(f"{self.who}: {len(self.subspaces)} layer subspaces {origin}")
            return
        path = self.path
        decision = (
            broadcast_decision(trainer, lambda: decide_file(self, trainer, pl_module, path))
            if path is not None
            else None
        )
        if decision is not None and decision["load"] is not None:
            self._load(path, pl_module, *decision["load"])
        else:
            self.subspaces = self.estimate(trainer, pl_module)
            if path is not None and trainer.is_global_zero:
                self.save(path, pl_module)
                rank_zero_info(f"{self.who}: subspaces saved to {path}")
        self.to(pl_module.device)
        if self.anchors:
            layout.attach_anchors(self.subspaces, on_host=self.anchors_on_host)

    def finish(self) -> None:
        """At the end of a fit: remember the model and weights these bases were last used with."""
        if self.subspaces and self.targets:
            self._ended = {"model": id(next(iter(self.targets.values()))), "weights": weights_checksum(self.targets)}

    def summarize(self, trainer: Trainer, pl_module: LightningModule, step: str = "") -> None:
        """The per-layer table in the log (rank 0), then ``step`` (the owner's per-step work), and each layer's k to the logger."""
        param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        bound = self.config.channel_bound if self.bounds_channel else None
        table = format_summary(self.subspaces, param_bytes, bound) + (f"\n{step}" if step else "")
        rank_zero_info(f"{self.who} protected subspaces\n" + table)
        warn_extreme_ranks(self.subspaces, self.config, self.who)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"fora/k/{n}": float(s.k) for n, s in self.subspaces.items()}, step=0)

    def _load(
        self, path: Path, pl_module: LightningModule, subspaces: dict[str, LayerSubspace], meta: dict[str, Any]
    ) -> None:
        """Adopt a file's bases (read on rank 0) after checking them against the model (``force``: names and shapes only)."""
        self.subspaces = subspaces
        if self.config.subspaces_reuse == "force":
            validate_against(self.subspaces, self.layout.shape_targets(), str(path))
        else:
            validate_against(self.subspaces, self.layout.shape_targets(), str(path), meta, model_identity(pl_module))
        self.capabilities, self.chain = dict(meta["capabilities"]), list(meta["chain"])
        self.capability_energy = {n: dict(info.get("capability_energy", {})) for n, info in meta["layers"].items()}
        if self.needs_q and any(s.complement for s in self.subspaces.values()):
            raise ValueError(
                f"{path} stores complement bases (gradient-mode); mode='update' needs Q itself: re-estimate with mode='update'"
            )
        rank_zero_info(f"{self.who}: loaded {len(self.subspaces)} layer subspaces from {path}")

    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces."""
        layout = self.bind(trainer)
        covariances = self.calibrate(trainer, pl_module) if self.config.source == "activations" else None
        weights = layout.full_weights()  # gathered one layer (FSDP1: one unit) at a time
        config, spectra, per = self.config, None, self._capability_covariances
        complement = not self.needs_q
        if covariances is not None and config.combine == "union" and len(per) > 1:
            if config.allocation != "energy":
                raise ValueError(
                    f"{self.who}: allocation={config.allocation!r} with combine='union' over {len(per)} capabilities: "
                    "union picks each capability's k itself; use combine='covariance' or allocation='energy'"
                )
            spectra, ks = union_spectra(per, config.energy, config.rank, config.capability_weights)
            config = replace(config, rank=ks)
        elif covariances is not None and config.allocation != "energy":
            ks = allocate_from_covariances(covariances, weights, config.energy, config.allocation, config.max_rank)
            config = replace(config, rank=ks, allocation="energy")
        if covariances is not None and spectra is None and trainer.world_size > 1:
            # eigh spread over ranks; each owner's layers are built as its spectrum arrives, then it is dropped
            groups, built = covariances.groups(), {}
            for owner, owner_spectrum in spread_spectra(covariances):
                layers = {n: weights[n] for n in groups[owner]}
                built.update(
                    estimate_subspaces(
                        layers, config, covariances, {owner: owner_spectrum}, allow_complement=complement
                    )
                )
            subspaces = {n: built[n] for n in weights}
        else:
            subspaces = estimate_subspaces(weights, config, covariances, spectra, allow_complement=complement)
        self.record_energy(subspaces, per)
        method = config.combine if len(per) > 1 else config.source
        self.chain = [{"step": 1, "capabilities": list(per), "method": method, "created": now()}]
        self._capability_covariances = {}
        return subspaces

    def calibrate(
        self, trainer: Trainer, pl_module: LightningModule, loader: Iterable[Any] | None = None
    ) -> Covariances:
        """Covariances of every target's input, summed over ranks. ``loader=None``: the configured source;
        several capabilities are collected one by one and combined (:func:`~fora_lightning.core.capabilities.combine_covariances`)."""
        if loader is None:
            source = resolve_calibration(self.calibration, trainer, pl_module)
            combined, self._capability_covariances, self.capabilities = self.calibrate_capabilities(
                trainer, pl_module, source, 1
            )
            return combined
        c = self.config
        return calibrate(
            trainer,
            pl_module,
            self.targets,
            loader,
            COVARIANCE_DTYPES[c.covariance_dtype],
            c.progress,
            c.calibration_generate,
            panel=c.covariance_panel,
            product=c.covariance_product,
            token_stride=c.covariance_token_stride,
            early_stop=c.calibration_early_stop,
        )

    def calibrate_capabilities(
        self, trainer: Trainer, pl_module: LightningModule, source: Any, step: int
    ) -> tuple[Covariances, dict[str, Covariances], dict[str, dict[str, Any]]]:
        """Collect each capability of ``source`` (a loader, named ``"default"``, or ``name -> loader``).

        Returns the combined covariances (the only one's, unchanged, for a single capability), the
        per-capability ones, and per capability its token count, weight and data fingerprint.
        """
        loaders = dict(source) if isinstance(source, Mapping) else {"default": source}
        configured = (
            self.config.capability_weights if isinstance(source, Mapping) and step == 1 else None
        )  # extend: equal
        weights = capability_weights(list(loaders), configured)
        per: dict[str, Covariances] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, loader in loaders.items():
            batches = FingerprintedBatches(loader)
            per[name] = self.calibrate(trainer, pl_module, batches)
            tokens = max(per[name].counts.values())
            info[name] = {"tokens": tokens, "weight": weights[name], "fingerprint": batches.digest, "step": step}
            rank_zero_info(
                f"{self.who}: capability '{name}': {tokens:,} calibration tokens, weight {weights[name]:.3g}"
            )
        combined = combine_covariances(per, weights) if len(per) > 1 else next(iter(per.values()))
        return combined, per, info

    def record_energy(self, subspaces: Mapping[str, LayerSubspace], per: Mapping[str, Covariances]) -> None:
        """``capability_energy[layer][c] = tr(Q^T C_c Q) / tr(C_c)`` for the capabilities just measured."""
        for name, sub in subspaces.items():
            entry = self.capability_energy.setdefault(name, {})
            for cap, cov in per.items():
                entry[cap] = captured_energy(sub.basis, cov.covariance(name), sub.complement)

    # ------------------------------------------------------------------ files and state
    def save(self, path: Path, pl_module: LightningModule) -> None:
        """Write the subspace file: bases, the model's identity, the capabilities, the chain and the settings."""
        metadata = {
            "model": model_identity(pl_module),
            "capabilities": self.capabilities,
            "chain": self.chain,
            "combine": self.config.combine,
            "config": self.config.to_dict(),
        }
        layer_metadata = {n: {"capability_energy": self.capability_energy.get(n, {})} for n in self.subspaces}
        save_subspaces(path, self.subspaces, metadata, layer_metadata)

    def state_dict(self) -> dict[str, Any]:
        """Bases and anchors, full-size: under FSDP2 the row-sharded ``anchor_q`` is gathered (a collective;
        Lightning calls this on every rank when it saves a checkpoint)."""
        return {
            "version": 1,
            "config": self.config.to_dict(),
            "layers": {
                name: {
                    "meta": {
                        "d_out": s.d_out,
                        "d_in": s.d_in,
                        "k": s.k,
                        "complement": s.complement,
                        "energy": s.energy,
                    },
                    "tensors": {k: self._full(name, k, t).detach().cpu() for k, t in s.tensors().items()},
                }
                for name, s in self.subspaces.items()
            },
            "capabilities": self.capabilities,
            "chain": self.chain,
            "capability_energy": self.capability_energy,
            "probe": self.monitor.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.subspaces = {
            name: LayerSubspace(**entry["meta"], **{k: t.clone() for k, t in entry["tensors"].items()})
            for name, entry in state_dict.get("layers", {}).items()
        }
        self.capabilities = dict(state_dict.get("capabilities", {}))
        self.chain = list(state_dict.get("chain", []))
        self.capability_energy = dict(state_dict.get("capability_energy", {}))
        self._restored, self._restored_config = bool(self.subspaces), state_dict.get("config")
        self.monitor.load_state_dict(state_dict.get("probe", {}))

    @property
    def anchors_on_host(
        self,
    ) -> bool:  # anchors in host memory (offload_anchors); else update mode needs Q itself, not C
        return self.anchors and self.config.offload_anchors

    @property
    def needs_q(self) -> bool:
        return self.anchors and not self.anchors_on_host

    def to(self, device: torch.device) -> None:
        for sub in self.subspaces.values():
            sub.to(device, anchors_on_host=self.anchors_on_host)

    def _full(self, name: str, field: str, t: torch.Tensor) -> torch.Tensor:
        return self.layout.full(name, field, t) if self.layout is not None else t
