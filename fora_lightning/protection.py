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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from fora_lightning.calibration import COVARIANCE_DTYPES, CalibrationSource, calibrate, resolve_calibration
from fora_lightning.config import ForaConfig
from fora_lightning.core.capabilities import capability_weights, combine_covariances, union_spectra
from fora_lightning.core.covariance import Covariances, calibration_groups
from fora_lightning.core.distributed import spread_spectra
from fora_lightning.core.energy import captured_energy
from fora_lightning.core.subspace import (
    SPLIT_FIELDS,
    LayerSubspace,
    complement_basis,
    estimate_subspaces,
    format_summary,
)
from fora_lightning.core.subspace_file import (
    FingerprintedBatches,
    model_identity,
    now,
    save_subspaces,
    validate_against,
)
from fora_lightning.core.sufficiency import (
    AUTO_SAMPLES,
    Sufficiency,
    duplicate_warning,
    sufficiency,
    sufficiency_warning,
)
from fora_lightning.core.targets import find_targets
from fora_lightning.layout import TargetLayout
from fora_lightning.monitor import ProtectionMonitor
from fora_lightning.reuse import weights_checksum
from fora_lightning.reuse_decisions import (
    broadcast_decision,
    check_resume,
    decide_file,
    drop_if_stale,
    forget,
    verify_captured,
)
from fora_lightning.safety import check_calibration_energy, warn_extreme_ranks
from fora_lightning.support import refuse_quantized_targets
from fora_lightning.targeting import select_targets


class Protection:
    """The protected subspaces of one model under one :class:`~fora_lightning.ForaConfig`.

    ``reprojects``: the owner keeps ``W - W0`` in S after every optimizer step (FORA's update mode), either by
    projecting each layer's step (``reprojection='step'``: no anchors, a complement basis where it is smaller) or
    from anchors ``W0 Q``, ``U_r^T W0`` (``'anchors'``: Q itself unless ``offload_anchors``); which one is decided at
    fit start (:meth:`resolve_reprojection`), when the weights' dtype is known. ``shardable``: under FSDP each rank
    keeps only its rows of the bases (FORA; FORA-LoRA's layers hold theirs whole).
    ``who`` names the owner in log lines and errors; ``bounds_channel``: the owner enforces ``config.channel_bound``.
    """

    def __init__(
        self,
        config: ForaConfig,
        calibration: CalibrationSource,
        reprojects: bool,
        who: str,
        bounds_channel: bool = True,
        shardable: bool = False,
    ) -> None:
        self.config = config
        self.bounds_channel = (
            bounds_channel  # whether the owner enforces config.channel_bound (FORA: mode='update' only)
        )
        self.calibration = calibration
        self.reprojects, self.shardable = reprojects, shardable
        self.anchors = False  # anchored re-projection: resolved at fit start (resolve_reprojection)
        self.who = who
        self.subspaces: dict[str, LayerSubspace] = {}
        self.targets: dict[str, nn.Linear] = {}
        self.layout: TargetLayout | None = None  # how the target weights are held (whole, FSDP2 rows, FSDP1 units)
        self.capabilities: dict[str, dict[str, Any]] = {}  # name -> tokens, weight, fingerprint, step
        self.capability_energy: dict[str, dict[str, float]] = {}  # layer -> capability -> tr(Q^T C_c Q) / tr(C_c)
        self.chain: list[dict[str, Any]] = []
        self._capability_covariances: dict[str, Covariances] = {}
        self._calibrating: list[str] | None = None  # the group of targets being calibrated (None: all)
        self._later_group = False  # calibrating a group after the first: no second sufficiency estimate
        self._group_samples: dict[str, int] = {}  # capability -> sampled continuations per row the first group used
        self.holdout: list[Any] = []  # the calibration hold-out slice's batches (CPU), all capabilities, this rank
        self.sufficiency: dict[str, Sufficiency] = {}  # capability -> the held-out estimate of this fit's calibration
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

    def resolve_reprojection(self) -> str | None:
        """``'step'`` or ``'anchors'`` (``None`` when the owner does not re-project): ``config.reprojection``, where
        ``'auto'`` is ``'step'`` for float32/float64 target weights and ``'anchors'`` for bf16/fp16 ones (their rounding
        after each step would accumulate without anchors: :func:`~fora_lightning.core.projection.project_step_`)."""
        if not self.reprojects:
            self.anchors = False
            return None
        choice = self.config.reprojection
        if choice == "auto" and self.config.offload_anchors:
            choice = "anchors"
        if choice == "auto":
            low = [n for n, m in self.targets.items() if m.weight.dtype not in (torch.float32, torch.float64)]
            choice = "anchors" if low else "step"
        self.anchors = choice == "anchors"
        return choice

    # ------------------------------------------------------------------ obtaining the bases
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bases from (in order) this object's restored state, the subspace file, or calibration; then on the device.

        Bases held from a previous ``fit`` are dropped (re-estimated, with a warning) when the model, its
        weights or the calibration data changed; restored ones are checked against the current settings. Bases
        held, restored or loaded from the file are then verified against the current calibration data
        (:func:`~fora_lightning.reuse_decisions.verify_captured`).
        """
        layout = self.bind(trainer)
        self.resolve_reprojection()
        restored, self._restored = self._restored, False
        if self.subspaces and not restored and self._ended is not None:
            drop_if_stale(self, trainer, pl_module)
        if self.subspaces:
            validate_against(self.subspaces, layout.shape_targets(), "the checkpoint")
            if restored:
                check_resume(self, trainer, pl_module)
            origin = "the checkpoint" if restored else "a previous fit"
            self.unshard()  # bases kept from a sharded fit: whole again to verify them (split again below)
            if verify_captured(self, trainer, pl_module, origin, trained=True):
                self.to(pl_module.device)
                if self.anchors:
                    layout.localize_anchors(self.subspaces)
                self._ready(layout, fresh=False)
                rank_zero_info(f"{self.who}: {len(self.subspaces)} layer subspaces from {origin}")
                return
            forget(self)
        path = self.path
        decision = (
            broadcast_decision(trainer, lambda: decide_file(self, trainer, pl_module, path))
            if path is not None
            else None
        )
        if decision is not None and decision["load"] is not None:
            self._load(path, pl_module, *decision["load"])
            if not verify_captured(self, trainer, pl_module, str(path), trained=False):
                forget(self)
        if not self.subspaces:
            self.subspaces = self.estimate(trainer, pl_module)
            if path is not None:
                self.save(path, pl_module, write=trainer.is_global_zero)  # split bases: gathered on every rank
                rank_zero_info(f"{self.who}: subspaces saved to {path}")
        self.to(pl_module.device)
        if self.anchors:
            layout.attach_anchors(self.subspaces, on_host=self.anchors_on_host)
        self._ready(layout, fresh=True)

    def _ready(self, layout: TargetLayout, fresh: bool) -> None:
        """Without anchors: drop any (a checkpoint's), start the channel's running coordinate ``delta`` at 0 for new
        bases (a restored one continues), and keep only this rank's rows of the bases under FSDP (``shardable``)."""
        step = self.reprojects and not self.anchors
        for sub in self.subspaces.values():
            if not self.anchors:
                sub.anchor_q = sub.anchor_u = sub.anchor_basis = None
                sub.anchors_on_host = False
            if step and (fresh or sub.delta is None):
                sub.delta = torch.zeros(sub.r, dtype=torch.float32, device=sub.u.device)
            elif not step:
                sub.delta = None
        if self.shardable and not self.anchors:
            layout.shard(self.subspaces)

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
        if (
            self.needs_q
        ):  # anchors need Q itself: a complement basis C (stored where smaller) becomes Q, shared as C was
            q_of: dict[int, torch.Tensor] = {}
            for sub in self.subspaces.values():
                if sub.complement:
                    sub.basis = q_of.setdefault(id(sub.basis), complement_basis(sub.basis))
                    sub.complement = False
        rank_zero_info(f"{self.who}: loaded {len(self.subspaces)} layer subspaces from {path}")

    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces.

        The covariance sums of all targets at once can exceed a device (``d_in^2`` each: 330 GB for a 70B model):
        when they would exceed ``calibration_memory_gib`` (auto: a quarter of the device's free memory), the targets
        are calibrated in consecutive groups that fit, each group's bases built and its sums dropped before the next
        group's pass (:func:`~fora_lightning.core.covariance.calibration_groups`; the early stop ends each pass after the
        group's last target). Under FSDP each layer's bases are split over the ranks as soon as they are built.
        """
        layout = self.bind(trainer)
        names = list(self.targets)
        groups = [names]
        if self.config.source == "activations":
            c = self.config
            # bytes per element of the sums held during a pass: the accumulator, twice with the hold-out slice's own
            size = COVARIANCE_DTYPES[c.covariance_dtype].itemsize * (2 if c.calibration_holdout > 0 else 1)
            shapes = layout.shape_targets()
            groups = calibration_groups(
                {n: shapes[n].in_features for n in names}, self._calibration_budget(trainer), size
            )
        if len(groups) > 1:
            rank_zero_info(
                f"{self.who}: calibrating in {len(groups)} groups of layers (their covariance sums together exceed "
                f"calibration_memory_gib): {len(groups)} passes over the calibration data"
            )
        subspaces: dict[str, LayerSubspace] = {}
        try:
            for i, group in enumerate(groups):
                self._later_group = i > 0
                subspaces.update(self._estimate_group(trainer, pl_module, layout, group))
        finally:
            self._later_group = False
        per = list(self.capabilities)
        method = self.config.combine if len(per) > 1 else self.config.source
        self.chain = [{"step": 1, "capabilities": per, "method": method, "created": now()}]
        return {n: subspaces[n] for n in names}

    def _calibration_budget(self, trainer: Trainer) -> int | None:
        """Bytes the covariance sums may take at once: ``calibration_memory_gib``, else a quarter of the free device
        memory on CUDA (the same on every rank: rank 0's), else no limit."""
        gib = self.config.calibration_memory_gib
        if gib is not None:
            return int(gib * 2**30)
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(device)[0] // 4
        return int(trainer.strategy.broadcast(free, src=0))

    def _estimate_group(
        self, trainer: Trainer, pl_module: LightningModule, layout: TargetLayout, names: list[str]
    ) -> dict[str, LayerSubspace]:
        """One group's calibration pass and subspaces (all targets when one group)."""
        self._calibrating = names
        try:
            covariances = self.calibrate(trainer, pl_module) if self.config.source == "activations" else None
        finally:
            self._calibrating = None
        every = layout.full_weights()  # gathered one layer (FSDP1: one unit) at a time
        weights = {n: every[n] for n in names} if len(names) < len(self.targets) else every
        config, spectra, per = self.config, None, self._capability_covariances
        complement = not self.needs_q
        if covariances is not None and config.combine == "union" and len(per) > 1:
            spectra, ks = union_spectra(per, config.energy, config.rank, config.capability_weights)
            config = replace(config, rank=ks)
        shards: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(built: dict[str, LayerSubspace]) -> dict[str, LayerSubspace]:
            """Record each capability's kept energy (full bases), then keep only this rank's rows under FSDP."""
            self.record_energy(built, per)
            if self.shardable and not self.anchors:
                for n, sub in built.items():
                    split = layout.split_for(n)
                    if split is not None and split.world > 1:
                        sub.shard(split, shards)
            return built

        if covariances is not None and spectra is None and trainer.world_size > 1:
            # eigh spread over ranks; each owner's layers are built as its spectrum arrives, then it is dropped
            owners, built = covariances.groups(), {}
            for owner, owner_spectrum in spread_spectra(covariances):
                layers = {n: weights[n] for n in owners[owner]}
                built.update(
                    keep(
                        estimate_subspaces(
                            layers, config, covariances, {owner: owner_spectrum}, allow_complement=complement
                        )
                    )
                )
            subspaces = {n: built[n] for n in names}
        else:
            subspaces = keep(estimate_subspaces(weights, config, covariances, spectra, allow_complement=complement))
        self._capability_covariances = {}
        return subspaces

    def calibrate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        loader: Iterable[Any] | None = None,
        holdout: list[Any] | None = None,
        samples: int = 0,
        originals: bool = True,
    ) -> Covariances:
        """Covariances of every target's input, summed over ranks. ``loader=None``: the configured source;
        several capabilities are collected one by one and combined (:func:`~fora_lightning.core.capabilities.combine_covariances`).
        ``holdout`` (a list): the hold-out slice (``calibration_holdout``) is summed apart into the result's
        ``held_out`` and its batches appended there; ``samples``: sampled continuations per row (``originals=False``:
        those only)."""
        if loader is None:
            source = resolve_calibration(self.calibration, trainer, pl_module)
            combined, self._capability_covariances, self.capabilities = self.calibrate_capabilities(
                trainer, pl_module, source, 1
            )
            check_calibration_energy(combined, self.config, self.who)
            return combined
        c = self.config
        targets = self.targets if self._calibrating is None else {n: self.targets[n] for n in self._calibrating}
        return calibrate(
            trainer,
            pl_module,
            targets,
            loader,
            COVARIANCE_DTYPES[c.covariance_dtype],
            c.progress,
            c.calibration_generate,
            samples,
            c.calibration_sample_tokens,
            originals,
            panel=c.covariance_panel,
            product=c.covariance_product,
            early_stop=c.calibration_early_stop,
            holdout_every=c.calibration_holdout if holdout is not None else 0,
            holdout=holdout,
        )

    def calibrate_capabilities(
        self, trainer: Trainer, pl_module: LightningModule, source: Any, step: int
    ) -> tuple[Covariances, dict[str, Covariances], dict[str, dict[str, Any]]]:
        """Collect each capability of ``source`` (a loader, named ``"default"``, or ``name -> loader``).

        Returns the combined covariances (the only one's, unchanged, for a single capability), the
        per-capability ones, and per capability its token count, weight and data fingerprint. On the first
        step (not ``extend``), each capability's sufficiency is estimated on its hold-out slice (:meth:`_collect`).
        """
        loaders = dict(source) if isinstance(source, Mapping) else {"default": source}
        configured = (
            self.config.capability_weights if isinstance(source, Mapping) and step == 1 else None
        )  # extend: equal
        weights = capability_weights(list(loaders), configured)
        per: dict[str, Covariances] = {}
        info: dict[str, dict[str, Any]] = {}
        if step == 1 and not self._later_group:
            self.holdout, self.sufficiency, self.monitor.calibration, self._group_samples = [], {}, {}, {}
        for name, loader in loaders.items():
            batches = FingerprintedBatches(loader)
            per[name] = (
                self._collect(trainer, pl_module, batches, name)
                if step == 1
                else self.calibrate(trainer, pl_module, batches)
            )
            tokens = max(per[name].counts.values())
            if step == 1 and not self._later_group:
                self._check_repeats(name, *batches.rows)
            info[name] = {"tokens": tokens, "weight": weights[name], "fingerprint": batches.digest, "step": step}
            rank_zero_info(
                f"{self.who}: capability '{name}': {tokens:,} calibration tokens, weight {weights[name]:.3g}"
            )
        combined = combine_covariances(per, weights) if len(per) > 1 else next(iter(per.values()))
        return combined, per, info

    def _collect(self, trainer: Trainer, pl_module: LightningModule, batches: Iterable[Any], name: str) -> Covariances:
        """One capability's covariances over all its batches, after the held-out sufficiency estimate
        (``calibration_holdout``; warns when short).

        ``calibration_samples='auto'``: also the share of the model's own sampled continuations of the hold-out
        rows that the basis holds (:meth:`_own_continuations`); when either is short, the capability is calibrated
        again with ``AUTO_SAMPLES`` sampled continuations per row added, and estimated again.
        """
        c = self.config
        if self._later_group:  # calibration in groups: the first group's estimate (and 'auto' decision) stands
            held = [] if c.calibration_holdout > 0 and c.source == "activations" else None  # the same sums, in order
            cov = self.calibrate(trainer, pl_module, batches, held, self._group_samples[name])
            return cov.merge_held_out_() if held is not None else cov
        self._group_samples[name] = _fixed_samples(c.calibration_samples)
        if c.calibration_holdout == 0 or c.source != "activations":
            return self.calibrate(trainer, pl_module, batches, samples=self._group_samples[name])
        holdout: list[Any] = []
        cov = self.calibrate(trainer, pl_module, batches, holdout, _fixed_samples(c.calibration_samples))
        estimate = self._estimate(cov)
        if c.calibration_samples == "auto" and holdout:
            own = self._own_continuations(trainer, pl_module, cov, holdout)
            if estimate.short or (own is not None and own.short):
                reason = estimate.verdict() if estimate.short else f"the model's own continuations: {own.verdict()}"
                rank_zero_info(
                    f"{self.who}: capability '{name}': {reason}. calibration_samples='auto': calibrating again with "
                    f"{AUTO_SAMPLES} sampled continuations of {c.calibration_sample_tokens} tokens per row"
                )
                holdout = []
                self._group_samples[name] = AUTO_SAMPLES
                cov = self.calibrate(trainer, pl_module, batches, holdout, AUTO_SAMPLES)
                before, estimate = estimate, self._estimate(cov)
                estimate.before = {**before.summary(), "own_continuations": own.summary() if own else None}
        self.sufficiency[name] = estimate
        self.monitor.calibration[name] = estimate.summary()
        self.holdout += holdout
        message = sufficiency_warning(estimate, name, c.calibration_holdout, self.who)
        if message is not None:
            rank_zero_warn(message)
        else:
            rank_zero_info(f"{self.who}: capability '{name}' calibration: {estimate.verdict()}")
        return cov.merge_held_out_()

    def _check_repeats(self, name: str, rows: int, distinct: int) -> None:
        """Record the capability's rows and distinct rows in the report; warn when most repeat another exactly."""
        self.monitor.calibration.setdefault(name, {}).update(rows=rows, distinct_rows=distinct)
        message = duplicate_warning(rows, distinct, name, self.who)
        if message is not None:
            rank_zero_warn(message)

    def _own_continuations(
        self, trainer: Trainer, pl_module: LightningModule, cov: Covariances, holdout: list[Any]
    ) -> Sufficiency | None:
        """How much of what the model reads while it answers the basis holds: the kept-in sums' basis measured on
        ``AUTO_SAMPLES`` sampled continuations of each hold-out row (generation on the hold-out slice only).
        One process only (the hold-out batches are per rank): ``None`` under several."""
        if trainer.world_size > 1:
            return None
        generated = self.calibrate(trainer, pl_module, holdout, samples=AUTO_SAMPLES, originals=False)
        return self._estimate(Covariances(cov.sums, cov.counts, cov.owner, held_out=generated))

    def _estimate(self, cov: Covariances) -> Sufficiency:
        held = cov.held_out
        tokens = max(c + (held.counts.get(o, 0) if held is not None else 0) for o, c in cov.counts.items())
        return sufficiency(cov, self.config, tokens, list(self._calibrating or self.targets))

    def record_energy(self, subspaces: Mapping[str, LayerSubspace], per: Mapping[str, Covariances]) -> None:
        """``capability_energy[layer][c] = tr(Q^T C_c Q) / tr(C_c)`` for the capabilities just measured."""
        for name, sub in subspaces.items():
            entry = self.capability_energy.setdefault(name, {})
            for cap, cov in per.items():
                entry[cap] = captured_energy(sub.basis, cov.covariance(name), sub.complement)

    # ------------------------------------------------------------------ files and state
    def save(self, path: Path, pl_module: LightningModule, write: bool = True) -> None:
        """Write the subspace file: bases, the model's identity, the capabilities, the chain and the settings.

        Split bases are gathered whole first (collectives: under FSDP every rank calls this, ``write`` on one)."""
        subspaces = self.whole_subspaces()
        if not write:
            return
        metadata = {
            "model": model_identity(pl_module),
            "capabilities": self.capabilities,
            "chain": self.chain,
            "combine": self.config.combine,
            "config": self.config.record(),
        }
        layer_metadata = {n: {"capability_energy": self.capability_energy.get(n, {})} for n in subspaces}
        save_subspaces(path, subspaces, metadata, layer_metadata)

    def whole_subspaces(self) -> dict[str, LayerSubspace]:
        """Every layer's subspaces with whole tensors (split ones gathered, on the CPU; a shared basis stays shared);
        the held ones themselves when nothing is split. A collective under FSDP."""
        if not any(s.split is not None for s in self.subspaces.values()):
            return self.subspaces
        out, whole = {}, {}
        for name, sub in self.subspaces.items():
            tensors = {}
            for field in SPLIT_FIELDS:
                t = getattr(sub, field)
                if t is not None:
                    if id(t) not in whole:
                        whole[id(t)] = sub.full(field).cpu()
                    tensors[field] = whole[id(t)]
            out[name] = replace(sub, split=None, **tensors)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Bases (and anchors), full-size on the CPU whatever the world size, so that a checkpoint resumes at another
        one: split bases and the FSDP2 row-sharded ``anchor_q`` are gathered (collectives; Lightning calls this on
        every rank when it saves). A basis shared by several layers (q/k/v) is stored once."""
        whole = self.whole_subspaces()  # split bases gathered (collectives), a shared basis still one tensor
        cpu: dict[int, torch.Tensor] = {}

        def on_cpu(name: str, field: str, t: torch.Tensor) -> torch.Tensor:
            if id(t) not in cpu:  # ``whole`` keeps every t alive: ids are not reused
                cpu[id(t)] = self._full(name, field, t).detach().cpu()
            return cpu[id(t)]

        return {
            "version": 1,
            "config": self.config.record(),
            "layers": {
                name: {
                    "meta": {
                        "d_out": s.d_out,
                        "d_in": s.d_in,
                        "k": s.k,
                        "complement": s.complement,
                        "energy": s.energy,
                    },
                    "tensors": {k: on_cpu(name, k, t) for k, t in s.tensors().items()},
                }
                for name, s in whole.items()
            },
            "capabilities": self.capabilities,
            "chain": self.chain,
            "capability_energy": self.capability_energy,
            "probe": self.monitor.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        copies: dict[int, torch.Tensor] = {}  # a tensor shared by layers in the checkpoint stays shared

        def own(t: torch.Tensor) -> torch.Tensor:
            return copies.setdefault(id(t), t.clone())

        self.subspaces = {
            name: LayerSubspace(**entry["meta"], **{k: own(t) for k, t in entry["tensors"].items()})
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
        # layers sharing a basis tensor still share it on the device (the originals are kept: ids are not reused)
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for sub in self.subspaces.values():
            basis = sub.basis
            sub.to(device, anchors_on_host=self.anchors_on_host)
            sub.basis = moved.setdefault(id(basis), (basis, sub.basis))[1]

    def unshard(self) -> None:
        """Every layer's bases whole again (collectives on every rank): before extending or reading them after a
        sharded fit."""
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (local rows kept alive, whole)
        for sub in self.subspaces.values():
            if sub.split is None:
                continue
            key = id(sub.basis)
            if key not in cache:
                cache[key] = (sub.basis, sub.full("basis"))
            sub.basis, sub.u, sub.v = cache[key][1], sub.full("u"), sub.full("v")
            if sub.spectrum is not None:
                sub.spectrum = sub.full("spectrum")
            sub.split = None

    def _full(self, name: str, field: str, t: torch.Tensor) -> torch.Tensor:
        return self.layout.full(name, field, t) if self.layout is not None else t


def _fixed_samples(samples: int | str) -> int:
    """``calibration_samples`` as a number of samples per row for the first pass ('auto': none)."""
    return 0 if samples == "auto" else int(samples)
