"""The FORA Callback: full fine-tuning whose update cannot read what a kept capability reads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from fora_lightning.core.covariance import Covariances, collect_covariances, eval_mode
from fora_lightning.core.distributed import RankShare, spread_spectra
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, estimate_subspaces, format_summary
from fora_lightning.core.capabilities import (
    GrownBasis, capability_weights, captured_energy, combine_covariances, extend_subspace, grow_basis, union_spectra,
)
from fora_lightning.core.subspace_file import (
    FingerprintedBatches, load_subspaces, model_identity, now, save_subspaces, validate_against,
)
from fora_lightning.core.targets import TargetModules, find_targets, name_matches
from fora_lightning.layout import TargetLayout

log = logging.getLogger(__name__)

Mode = Literal["update", "gradient"]
CalibrationSource = Iterable[Any] | Mapping[str, Iterable[Any]] | Callable[[], Iterable[Any]] | None

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FORA(Callback):
    r"""Function-space orthogonal residual adaptation (FORA, arXiv 2606.31092) for full fine-tuning.

    At the start of fit it runs label-free calibration inputs of the capability to keep through
    the model, estimates for each target linear layer ``y = W x`` the input directions the
    capability occupies (``Q``, top eigenvectors of ``C = (1/N) sum_t x_t x_t^T``) and the weight's
    top singular triplets ``(U_r, S_r, V_r)``. Training then keeps ``W - W0`` in

    .. math:: S = \{ (I - U_r U_r^T) M (I - Q Q^T) + U_r \operatorname{diag}(\delta) V_r^T \}

    by projecting every gradient (``on_before_optimizer_step``) and, with ``mode="update"``,
    re-projecting the weight right after each optimizer step (Adam's scaling and weight decay
    leave ``S``). For inputs in span(Q) the layer's output then changes only through the
    ``r``-dimensional spectral channel.

    Args:
        calibration: a DataLoader (or a callable returning one) of the capability to keep, or a mapping
            ``name -> DataLoader`` to keep several. ``None``: ``trainer.datamodule.calibration_dataloader()``,
            else ``pl_module.calibration_dataloader()`` (either may return a mapping).
        capability_weights: ``name -> w`` for several capabilities (default equal); each capability's
            covariance is normalised by its own token count, then ``C = sum_c w_c C_c / sum_c w_c``.
        combine: ``"covariance"`` (basis from the combined C) or ``"union"`` (union of the per-capability
            bases, each chosen by ``energy`` on its own covariance, re-orthonormalised).
        extend_to: after fit, :meth:`extend` the subspaces with the task just learned and write the
            merged file here (chained fine-tunes). extend_calibration: that task's loader(s) for it
            (``None``: the datamodule's ``train_dataloader()``, else the trainer's).
        target_modules: module-name suffixes matched on ``.`` boundaries, or one regex string.
        energy: keep the smallest k whose eigenvalues hold this fraction of the trace.
        rank: a fixed k (int, or per-layer mapping) instead of ``energy``. max_rank: cap on k.
        weight_rank: r, top singular triplets of W0 protected (0 turns off left projector and channel).
        source: ``"activations"`` (FORA), ``"weights"`` (weight-space baseline), ``"random"`` (control).
        mode: ``"update"`` (project gradients and re-project weights) or ``"gradient"`` (gradients only).
        freeze_other: freeze every parameter that is not a target weight (biases, norms, embeddings).
        subspaces: a file to load bases from when it exists, else to save the estimated ones to.
        covariance_dtype: ``"float32"`` or ``"float64"`` accumulators.
        progress: show a progress bar during calibration (rank 0).

    Example::

        from fora_lightning import FORA
        trainer = Trainer(callbacks=[FORA(calibration=keep_loader, target_modules=["q_proj", "up_proj"])])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        calibration: CalibrationSource = None,
        target_modules: TargetModules = DEFAULT_TARGETS,
        energy: float = 0.99,
        rank: int | Mapping[str, int] | None = None,
        max_rank: int | None = None,
        weight_rank: int = 8,
        source: Literal["activations", "weights", "random"] = "activations",
        mode: Mode = "update",
        freeze_other: bool = True,
        subspaces: str | Path | None = None,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        seed: int = 0,
        progress: bool = True,
        capability_weights: Mapping[str, float] | None = None,
        combine: Literal["covariance", "union"] = "covariance",
        extend_to: str | Path | None = None,
        extend_calibration: CalibrationSource = None,
    ) -> None:
        if mode not in ("update", "gradient"):
            raise ValueError(f"mode must be 'update' or 'gradient', got {mode!r}")
        if covariance_dtype not in _DTYPES:
            raise ValueError(f"covariance_dtype must be 'float32' or 'float64', got {covariance_dtype!r}")
        self.calibration = calibration
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.config = SubspaceConfig(energy=energy, rank=rank, max_rank=max_rank, weight_rank=weight_rank, source=source, seed=seed)
        self.mode: Mode = mode
        self.freeze_other = freeze_other
        self.subspaces_path = Path(subspaces) if subspaces is not None else None
        self.covariance_dtype = _DTYPES[covariance_dtype]
        self.progress = progress
        if combine not in ("covariance", "union"):
            raise ValueError(f"combine must be 'covariance' or 'union', got {combine!r}")
        self.capability_weights = dict(capability_weights) if capability_weights is not None else None
        self.combine = combine
        self.extend_to = Path(extend_to) if extend_to is not None else None
        self.extend_calibration = extend_calibration
        self.capabilities: dict[str, dict[str, Any]] = {}  # name -> tokens, weight, fingerprint, step
        self.capability_energy: dict[str, dict[str, float]] = {}  # layer -> capability -> tr(Q^T C_c Q) / tr(C_c)
        self.chain: list[dict[str, Any]] = []
        self._capability_covariances: dict[str, Covariances] = {}
        self.subspaces: dict[str, LayerSubspace] = {}
        self._targets: dict[str, nn.Linear] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._layout: TargetLayout | None = None  # how the target weights are held (whole, FSDP2 rows, FSDP1 units)

    @property
    def state_key(self) -> str:
        return "FORA"

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the targets and freeze the rest, before the strategy wraps the model."""
        if stage != "fit":
            return
        when_targets_exist(pl_module, self.target_modules, lambda: self._select_targets(pl_module))

    def _select_targets(self, pl_module: LightningModule) -> None:
        self._targets = select_targets(pl_module, self.target_modules, self.freeze_other, "FORA")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Register the post-step re-projection on every optimizer (once per fit)."""
        self._remove_hooks()
        present = {id(m) for m in pl_module.modules()}
        if not self._targets or any(id(m) not in present for m in self._targets.values()):
            self._targets = find_targets(pl_module, self.target_modules)  # FSDP1 keeps the Linear objects
        if self.mode == "update":
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Estimate (or load) the subspaces before the first step, unless a checkpoint restored them."""
        self._bind_layout(trainer)
        if self.subspaces:
            validate_against(self.subspaces, self._layout.shape_targets(), "the checkpoint")
            self._to_device(pl_module.device)
            self._layout.localize_anchors(self.subspaces)
            rank_zero_info(f"FORA: {len(self.subspaces)} layer subspaces restored from the checkpoint")
            return
        if self.subspaces_path is not None and self.subspaces_path.is_file():
            self.subspaces, meta = load_subspaces(self.subspaces_path)
            configured = list(self.calibration) if isinstance(self.calibration, Mapping) else None
            validate_against(self.subspaces, self._layout.shape_targets(), str(self.subspaces_path), meta, model_identity(pl_module), configured)
            self.capabilities, self.chain = dict(meta["capabilities"]), list(meta["chain"])
            self.capability_energy = {n: dict(info.get("capability_energy", {})) for n, info in meta["layers"].items()}
            if self.mode == "update" and any(s.complement for s in self.subspaces.values()):
                raise ValueError(
                    f"{self.subspaces_path} stores complement bases (gradient-mode); mode='update' needs Q itself: "
                    "re-estimate with mode='update'"
                )
            rank_zero_info(f"FORA: loaded {len(self.subspaces)} layer subspaces from {self.subspaces_path}")
        else:
            self.subspaces = self.estimate(trainer, pl_module)
            if self.subspaces_path is not None and trainer.is_global_zero:
                self._save(self.subspaces_path, pl_module)
                rank_zero_info(f"FORA: subspaces saved to {self.subspaces_path}")
        self._to_device(pl_module.device)
        if self.mode == "update":
            self._layout.attach_anchors(self.subspaces)
        param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        rank_zero_info("FORA protected subspaces\n" + format_summary(self.subspaces, param_bytes))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"fora/k/{n}": float(s.k) for n, s in self.subspaces.items()}, step=0)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """``grad <- Pi(grad)`` for every target weight (local rows + one ``r x d_in`` all-reduce under FSDP2;
        one FSDP1 unit gathered at a time)."""
        self._layout.project_grads(self.subspaces)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        restore_configure_model(pl_module)

    # ------------------------------------------------------------------ estimation
    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, LayerSubspace]:
        """Calibrate (for ``source="activations"``) and build every target's subspaces."""
        self._bind_layout(trainer)
        covariances = self.calibrate(trainer, pl_module) if self.config.source == "activations" else None
        weights = self._layout.full_weights()  # gathered one layer (FSDP1: one unit) at a time
        config, spectra, per = self.config, None, self._capability_covariances
        complement = self.mode == "gradient"
        if covariances is not None and self.combine == "union" and len(per) > 1:
            spectra, ks = union_spectra(per, config.energy, config.rank, self.capability_weights)
            config = replace(config, rank=ks)
        if covariances is not None and spectra is None and trainer.world_size > 1:
            # eigh spread over ranks; each owner's layers are built as its spectrum arrives, then it is dropped
            groups, built = covariances.groups(), {}
            for owner, owner_spectrum in spread_spectra(covariances):
                layers = {n: weights[n] for n in groups[owner]}
                built.update(estimate_subspaces(layers, config, covariances, {owner: owner_spectrum}, allow_complement=complement))
            subspaces = {n: built[n] for n in weights}
        else:
            subspaces = estimate_subspaces(weights, config, covariances, spectra, allow_complement=complement)
        self._record_energy(subspaces, per)
        self.chain = [{"step": 1, "capabilities": list(per), "method": self.combine if len(per) > 1 else self.config.source, "created": now()}]
        self._capability_covariances = {}
        return subspaces

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, loader: Iterable[Any] | None = None) -> Covariances:
        """Covariances of every target's input over this rank's share of the calibration batches, summed over ranks.

        ``loader=None``: the configured source; several capabilities are collected one by one and
        combined (:func:`~fora_lightning.core.capabilities.combine_covariances`).
        """
        if loader is None:
            source = self._calibration_loader(trainer, pl_module)
            combined, self._capability_covariances, self.capabilities = self._calibrate_capabilities(trainer, pl_module, source, 1)
            return combined
        forward = _calibration_forward(pl_module, trainer.strategy.model)

        def step(batch: Any) -> None:
            with trainer.precision_plugin.forward_context():
                forward(trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch)))  # bf16-true: cast inputs

        share = RankShare(loader, trainer.global_rank, trainer.world_size)
        covariances = collect_covariances(
            pl_module, self._targets, share, step, dtype=self.covariance_dtype, progress=self.progress and trainer.is_global_zero
        )
        if share.empty:  # fewer batches than ranks: this rank ran one only to learn the shapes
            for o in covariances.sums:
                covariances.sums[o].zero_()
                covariances.counts[o] = 0
        if share.padding:  # FSDP/DDP forwards are collectives: every rank runs ceil(n / world_size) of them
            with eval_mode(trainer.strategy.model), torch.no_grad():
                for _ in range(share.padding):
                    step(share.filler())
        if share.sharded:
            covariances.all_reduce_()
        return covariances

    def _calibration_loader(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[Any]:
        return resolve_calibration(self.calibration, trainer, pl_module)

    def _calibrate_capabilities(
        self, trainer: Trainer, pl_module: LightningModule, source: Any, step: int
    ) -> tuple[Covariances, dict[str, Covariances], dict[str, dict[str, Any]]]:
        """Collect each capability of ``source`` (a loader, named ``"default"``, or ``name -> loader``).

        Returns the combined covariances (the only one's, unchanged, for a single capability), the
        per-capability ones, and per capability its token count, weight and data fingerprint.
        """
        loaders = dict(source) if isinstance(source, Mapping) else {"default": source}
        configured = self.capability_weights if isinstance(source, Mapping) and step == 1 else None  # extend: equal
        weights = capability_weights(list(loaders), configured)
        per: dict[str, Covariances] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, loader in loaders.items():
            batches = FingerprintedBatches(loader)
            per[name] = self.calibrate(trainer, pl_module, batches)
            tokens = max(per[name].counts.values())
            info[name] = {"tokens": tokens, "weight": weights[name], "fingerprint": batches.digest, "step": step}
            rank_zero_info(f"FORA: capability '{name}': {tokens:,} calibration tokens, weight {weights[name]:.3g}")
        combined = combine_covariances(per, weights) if len(per) > 1 else next(iter(per.values()))
        return combined, per, info

    def extend(
        self, trainer: Trainer, pl_module: LightningModule, calibration: CalibrationSource = None, path: str | Path | None = None
    ) -> dict[str, LayerSubspace]:
        """Chained fine-tunes: add the task just learned to the protected subspaces, GPM-style.

        Its covariances are measured through the *tuned* model (``calibration``: a loader or
        ``name -> loader``; ``None``: the task's training data), and each layer's Q grows by the
        top residual directions ``(I - QQ^T) C (I - QQ^T)`` until ``energy`` of ``C`` is held (capped
        by ``max_rank``); ``U_r, S_r, V_r`` and the anchors come from the tuned weights, the next run's W0.
        Writes the merged file to ``path`` (rank 0) when given and keeps the result for a next ``fit``.
        """
        if not self.subspaces:
            raise ValueError("FORA.extend needs the subspaces of the capabilities already kept: fit first, or give subspaces=FILE")
        if self.config.source != "activations":
            raise ValueError(f"FORA.extend measures activations; source={self.config.source!r} has none to extend")
        if calibration is None:
            calibration = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        if callable(calibration) and not hasattr(calibration, "__iter__"):
            calibration = calibration()
        step = len(self.chain) + 1
        if not isinstance(calibration, Mapping):
            calibration = {f"task{step}": calibration}
        clash = [n for n in calibration if n in self.capabilities]
        if clash:
            raise ValueError(f"FORA.extend: capabilities {clash} are already protected ({list(self.capabilities)}); give new names")
        self._targets = self._targets or find_targets(pl_module, self.target_modules)
        combined, per, info = self._calibrate_capabilities(trainer, pl_module, calibration, step)
        merged: dict[str, LayerSubspace] = {}
        added: dict[str, int] = {}
        grown: dict[tuple[str, int], GrownBasis] = {}  # layers reading one input with one basis tensor grow it once
        for name, sub in self.subspaces.items():
            weight = self._targets[name].weight.detach()
            weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
            if tuple(weight.shape) != (sub.d_out, sub.d_in):
                raise ValueError(f"FORA.extend: layer '{name}' holds a {tuple(weight.shape)} shard, not its full weight; extend on one process")
            cov, key = combined.covariance(name), (combined.owner[name], sub.basis.data_ptr())
            if key not in grown:
                grown[key] = grow_basis(sub, cov, self.config.energy, self.config.max_rank, allow_complement=self.mode == "gradient")
            merged[name], added[name] = extend_subspace(
                sub, weight, cov, self.config.energy, self.config.weight_rank, self.config.max_rank, grown=grown[key]
            )
            if self.mode == "update":
                merged[name].attach_anchors(weight)
        self.subspaces = merged
        self.capabilities = {**self.capabilities, **info}
        self._record_energy(merged, per)
        self.chain.append({"step": step, "capabilities": list(per), "method": "gpm", "created": now()})
        rank_zero_info(f"FORA.extend: {list(per)} added {sum(added.values())} directions over {len(added)} layers")
        if path is not None and trainer.is_global_zero:
            self._save(Path(path), pl_module)
            rank_zero_info(f"FORA: extended subspaces saved to {path}")
        return merged

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``extend_to``: :meth:`extend` with ``extend_calibration`` and write the merged file there."""
        if self.extend_to is not None:
            self.extend(trainer, pl_module, self.extend_calibration, self.extend_to)

    def _record_energy(self, subspaces: Mapping[str, LayerSubspace], per: Mapping[str, Covariances]) -> None:
        """``capability_energy[layer][c] = tr(Q^T C_c Q) / tr(C_c)`` for the capabilities just measured."""
        for name, sub in subspaces.items():
            entry = self.capability_energy.setdefault(name, {})
            for cap, cov in per.items():
                entry[cap] = captured_energy(sub.basis, cov.covariance(name), sub.complement)

    def _save(self, path: Path, pl_module: LightningModule) -> None:
        metadata = {
            "model": model_identity(pl_module), "capabilities": self.capabilities, "chain": self.chain,
            "combine": self.combine, "config": self._config_dict(),
        }
        layer_metadata = {n: {"capability_energy": self.capability_energy.get(n, {})} for n in self.subspaces}
        save_subspaces(path, self.subspaces, metadata, layer_metadata)

    # ------------------------------------------------------------------ step hooks
    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``W <- W0 + Pi(W - W0)`` from the anchors (fires only for steps the optimizer really took)."""
        if self._layout is not None:
            self._layout.reproject(self.subspaces)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Bases and anchors, full-size: under FSDP2 the row-sharded ``anchor_q`` is gathered (a collective;
        Lightning calls this on every rank when it saves a checkpoint)."""
        return {
            "version": 1,
            "config": self._config_dict(),
            "layers": {
                name: {
                    "meta": {"d_out": s.d_out, "d_in": s.d_in, "k": s.k, "complement": s.complement, "energy": s.energy},
                    "tensors": {k: self._full(name, k, t).detach().cpu() for k, t in s.tensors().items()},
                }
                for name, s in self.subspaces.items()
            },
            "capabilities": self.capabilities, "chain": self.chain, "capability_energy": self.capability_energy,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.subspaces = {
            name: LayerSubspace(**entry["meta"], **{k: t.clone() for k, t in entry["tensors"].items()})
            for name, entry in state_dict.get("layers", {}).items()
        }
        self.capabilities = dict(state_dict.get("capabilities", {}))
        self.chain = list(state_dict.get("chain", []))
        self.capability_energy = dict(state_dict.get("capability_energy", {}))

    # ------------------------------------------------------------------ helpers
    def _config_dict(self) -> dict[str, Any]:
        c = self.config
        rank = dict(c.rank) if isinstance(c.rank, Mapping) else c.rank
        return {
            "target_modules": self.target_modules, "energy": c.energy, "rank": rank, "max_rank": c.max_rank,
            "weight_rank": c.weight_rank, "source": c.source, "mode": self.mode, "seed": c.seed,
        }

    def _to_device(self, device: torch.device) -> None:
        for sub in self.subspaces.values():
            sub.to(device)

    def _bind_layout(self, trainer: Trainer) -> None:
        """Bind the targets to how the strategy holds them (whole, FSDP2 row shards, FSDP1 flat units)."""
        self._layout = TargetLayout(self._targets, trainer.strategy.model)

    def _full(self, name: str, field: str, t: torch.Tensor) -> torch.Tensor:
        return self._layout.full(name, field, t) if self._layout is not None else t

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def resolve_calibration(calibration: CalibrationSource, trainer: Trainer, pl_module: LightningModule) -> Any:
    """``calibration`` (called if it is a factory), else ``trainer.datamodule.calibration_dataloader()``,
    else ``pl_module.calibration_dataloader()``; either may be a loader or a mapping ``name -> loader``."""
    if calibration is not None:
        return calibration() if callable(calibration) and not hasattr(calibration, "__iter__") else calibration
    for owner in (trainer.datamodule, pl_module):
        fn = getattr(owner, "calibration_dataloader", None)
        if callable(fn):
            return fn()
    raise ValueError(
        "FORA found no calibration data. It looked at FORA(calibration=...) (None), "
        f"trainer.datamodule.calibration_dataloader() ({'no datamodule' if trainer.datamodule is None else 'not defined'}) "
        f"and {type(pl_module).__name__}.calibration_dataloader() (not defined). Pass a DataLoader of the capability to keep"
    )


def when_targets_exist(pl_module: LightningModule, target_modules: TargetModules, select: Callable[[], None]) -> None:
    """Run ``select()`` now, or right after ``configure_model`` when the module builds its targets there.

    Lightning calls ``Callback.setup`` before ``LightningModule.configure_model`` and wraps the model
    (DDP, FSDP1) right after it, so layers created in ``configure_model`` can only be found and frozen
    in between: the module's ``configure_model`` is wrapped, for this fit, by one that runs ``select()``
    after it. A module that defines no ``configure_model`` gets ``select()`` now, and its error.
    """
    present = any(name and name_matches(name, target_modules) for name, _ in pl_module.named_modules())
    if present or not is_overridden("configure_model", pl_module):
        select()
        return
    configure_model = pl_module.configure_model

    def configure_model_then_select() -> None:
        configure_model()
        restore_configure_model(pl_module)
        select()

    pl_module.configure_model = configure_model_then_select  # Lightning looks the hook up on the instance


def restore_configure_model(pl_module: LightningModule) -> None:
    """Drop the instance-level ``configure_model`` set by :func:`when_targets_exist` (a fit that never got there)."""
    pl_module.__dict__.pop("configure_model", None)


def select_targets(pl_module: LightningModule, target_modules: TargetModules, freeze_other: bool, who: str) -> dict[str, nn.Linear]:
    """:func:`~fora_lightning.core.targets.find_targets`, then (``freeze_other``) :func:`freeze_non_targets`."""
    targets = find_targets(pl_module, target_modules)
    if freeze_other:
        freeze_non_targets(pl_module, targets, who)
    return targets


def freeze_non_targets(pl_module: LightningModule, targets: Mapping[str, nn.Linear], who: str) -> None:
    """``requires_grad=False`` on every parameter that is not a target weight, with counts in the log."""
    target_ids = {id(m.weight) for m in targets.values()}
    frozen = kept = frozen_numel = kept_numel = 0
    for p in pl_module.parameters():
        if id(p) in target_ids:
            kept += 1
            kept_numel += p.numel()
            if not p.requires_grad:
                rank_zero_warn(f"{who}: a target weight has requires_grad=False; it will not train")
        elif p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
            frozen_numel += p.numel()
    rank_zero_info(
        f"{who}: training {kept} target weights ({kept_numel:,} parameters); froze {frozen} other parameter tensors "
        f"({frozen_numel:,} parameters: biases, norms, embeddings, ...). Set freeze_other=False to train them unprotected."
    )


def _calibration_forward(pl_module: LightningModule, wrapper: nn.Module | None = None) -> Callable[[Any], Any]:
    """``calibration_step(batch)`` if the module defines it, else ``module(**batch)`` / ``(*batch)`` / ``(batch)``.

    With a strategy ``wrapper`` (DDP, FSDP1) the call goes through the wrapper's ``forward``, as Lightning
    routes ``training_step``: a bare FSDP1 module only holds shards.
    """
    call: nn.Module = wrapper if wrapper is not None else pl_module
    step = getattr(pl_module, "calibration_step", None)
    if callable(step):
        if call is pl_module:
            return step
        return lambda batch: _ForwardRedirection()(call, pl_module, "calibration_step", batch)

    def forward(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return call(**batch)
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, torch.Tensor)):
            return call(*batch)
        return call(batch)

    return forward
