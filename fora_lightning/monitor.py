"""The leakage sentinel: FORA's guarantee checked at run time, its verdicts, and the end-of-fit report.

:class:`ProtectionMonitor` is held by both Callbacks (through :class:`~fora_lightning.protection.Protection`):

* ``start`` (``on_train_start``, weights still ``W0``): the probe rows come from, in order, the Callback's
  ``probe=`` loader, ``trainer.datamodule.preserve_val_dataloader()``, the calibration hold-out
  (``Protection.holdout``), else the first calibration batch (:func:`calibration_slice`, in-sample). One batch
  runs through the model; each protected layer keeps ``rows`` of its inputs ``X``, their span(Q) part ``X_Q`` and
  its own outputs on them (:class:`~fora_lightning.probe.ProtectionProbe`). With a held-out loader the base
  model's logits on its first ``report_batches`` batches are kept on the CPU for ``KL(base || tuned)``.
* ``step`` (``on_train_batch_end``), every ``trainer.log_every_n_steps`` optimizer steps, and ``finish``
  (``on_train_end``), with or without a logger: a reading of every layer, held against what the settings certify
  on span(Q) (:mod:`fora_lightning.core.leakage`): outside the spectral channel, the numerical slack of the
  layer's dtype; all of it, ``channel_bound`` times the base output (with a bounded channel). The first reading
  past its bound warns once per fit with ``FORA:`` naming the layer, the value, the bound and the likely causes
  with their fixes, or raises :class:`ProtectionViolation` with ``on_violation="raise"``. To every logger:
  ``fora/leakage_max``, ``fora/leakage_mean`` (outside the channel), ``fora/span_change_max`` (all of it),
  ``fora/leakage_heldout_max`` (the raw rows, informational) and ``fora/leakage/<layer>`` every
  ``per_layer_every`` checks.
* ``finish`` also writes ``fora_report.json`` and ``fora_report.md`` in ``trainer.log_dir`` (rank 0; with a
  logger): the probe's source, the worst readings of the fit and the bounds they were held against, the verdict.

Every rank holds the same rows (forwards are collectives under FSDP) and reaches the same verdict (one boolean
all-reduce per check). A run resumed from a checkpoint restores the probe (saved with the bases); the base logits
are not saved, so its report has no KL. Cost: :mod:`fora_lightning.probe` (one forward of ``2 rows + 1`` rows
per layer per check; ``benchmarks/sentinel_cost.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from fora_lightning.calibration import calibration_forward, early_stop_safe, materialize, resolve_calibration
from fora_lightning.core.distributed import row_shard
from fora_lightning.core.leakage import heldout_tolerance, span_bound
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.fora_report import layer_rows, write_report
from fora_lightning.probe import ProtectionProbe, Reading, base_weight, is_lora
from fora_lightning.safety import ADAPTIVE


class ProtectionViolation(RuntimeError):
    """A protected layer's output moved past what FORA certifies (``ForaConfig(on_violation="raise")``)."""


@dataclass
class Limits:
    """What one layer's readings are held against: ``tolerance`` (outside the channel), ``span`` (all of it; ``None``
    with an unbounded channel), ``heldout`` (the raw rows, informational; ``None`` with an unbounded channel)."""

    tolerance: float
    span: float | None
    heldout: float | None


def preserved_loader(trainer: Trainer) -> Iterable[Any] | None:
    """``trainer.datamodule.preserve_val_dataloader()`` when the datamodule has one (and it is not ``None``)."""
    fn = getattr(trainer.datamodule, "preserve_val_dataloader", None)
    return fn() if callable(fn) else None


def calibration_slice(owner: Any, trainer: Trainer, pl_module: LightningModule) -> list[Any] | None:
    """The first batch of the calibration source (of its first capability), or ``None``.

    Stand-in for the calibration hold-out (``Protection.holdout``, rows kept out of the covariances): until every
    run has one, the sentinel probes on a calibration batch. That batch is in-sample (it also shaped the bases),
    which does not matter for the certified readings on span(Q) and makes the raw-row reading optimistic.
    A single-pass source (an iterator) is not read again.
    """
    try:
        source = resolve_calibration(getattr(owner, "calibration", None), trainer, pl_module)
    except ValueError:
        return None
    if isinstance(source, Mapping):
        source = next(iter(source.values()), None)
    if source is None or isinstance(source, Iterator):
        return None
    for batch in source:
        return [batch]
    return None


def _logits(out: Any) -> Tensor | None:
    logits = getattr(out, "logits", out)
    return logits if isinstance(logits, Tensor) and logits.dim() == 3 else None


def _exceeds(value: float | None, bound: float | None) -> bool:
    """``value > bound`` (NaN exceeds every bound); nothing to hold when either is ``None``."""
    return value is not None and bound is not None and not value <= bound


class ProtectionMonitor:
    """The sentinel and the report of one fit (``rows`` probe tokens per layer, ``0``: off; ``report_batches``
    held-out batches for the KL). ``owner``: the :class:`~fora_lightning.protection.Protection` whose settings
    (``config``, ``bounds_channel``), calibration and hold-out it reads."""

    def __init__(
        self, who: str, owner: Any = None, rows: int = 64, per_layer_every: int = 10, report_batches: int = 4
    ) -> None:
        self.who, self.owner = who, owner
        self.rows, self.per_layer_every, self.report_batches = rows, per_layer_every, report_batches
        self.probe: ProtectionProbe | None = None
        self.limits: dict[str, Limits] = {}
        self.source: Any = None  # the Callback's ``probe=`` loader
        self.probe_source = "none"
        self.held_out = False
        self._reference: list[tuple[dict[str, Tensor], Tensor]] = []  # (batch on CPU, base logits on CPU)
        self._restored: dict[str, Any] | None = None
        self.calibration: dict[str, Any] = {}  # capability -> the calibration sufficiency summary (core/sufficiency.py)
        self._reset()

    def _reset(self) -> None:
        """The per-fit verdict state."""
        self.checks = 0
        self.worst: dict[str, dict[str, Any]] = {}  # kind -> {value, layer, step, bound}
        self.violation: dict[str, Any] | None = None
        self._last_step = -1
        self._logged_step = -1

    @property
    def config(self) -> Any:
        return getattr(self.owner, "config", None)

    @property
    def on_violation(self) -> str:
        """The owner's ``on_violation`` ('warn' without an owner)."""
        return getattr(self.config, "on_violation", "warn")

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        modules: Mapping[str, nn.Module],
        subspaces: Mapping[str, LayerSubspace],
    ) -> None:
        """Keep the probe rows and base outputs (or restore them; or keep the previous fit's when the bases were kept)."""
        kept = self.probe is not None and self._same_bases(modules, subspaces) and self._restored is None
        restored_worst = (self._restored or {}).get("worst")
        self._reset()
        self._last_step = trainer.global_step
        if not kept:
            self.probe, self._reference, self.limits = None, [], {}
            self.probe_source, self.held_out = "none", False
        if self.rows <= 0 or self.on_violation == "off":
            self.probe, self.probe_source = None, "off"
            return
        if any(is_lora(m) and row_shard(base_weight(m)) is not None for m in modules.values()):
            rank_zero_warn(
                f"FORA: {self.who}'s leakage sentinel is off for FORA-LoRA layers sharded by FSDP2 (not implemented)"
            )
            self.probe_source = "off (FORA-LoRA under FSDP2)"
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            rank_zero_warn(
                f"FORA: {self.who}'s leakage sentinel is off under FSDP1 (flat parameters): use FSDP2 or DDP"
            )
            self.probe_source = "off (FSDP1)"
            return
        if kept:
            self.probe.model = pl_module
            return
        probe = ProtectionProbe(pl_module, modules, subspaces)
        if self._restored is not None:
            state, self._restored = self._restored, None
            layers = state.get("layers", {})
            if set(layers) == set(modules) and probe.load_state_dict(layers):
                self.probe, self.probe_source = probe, str(state.get("source", "restored from the checkpoint"))
                self.worst = dict(restored_worst or {})
                self._set_limits(subspaces)
                return
        if trainer.global_step > 0:
            rank_zero_warn(
                f"FORA: {self.who} resumed without the probe's rows in the checkpoint (saved before the leakage "
                "sentinel, or without it): this fit is not checked. A fresh fit from these weights checks again"
            )
            return
        label, batches, held_out, given = self._probe_batches(trainer, pl_module)
        if batches is None:
            rank_zero_info(
                f"FORA: {self.who} has no probe rows for its leakage sentinel (no probe=, no "
                "datamodule.preserve_val_dataloader(), no re-iterable calibration loader): this fit is not checked"
            )
            return
        forward = calibration_forward(pl_module, trainer.strategy.model)
        stop = early_stop_safe(trainer.strategy, trainer.strategy.model or pl_module)

        def move(b: Any) -> Any:
            return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(b))

        try:
            with trainer.precision_plugin.forward_context():
                probe.capture(trainer.strategy.model, (move(b) for b in batches), forward, self.rows, stop)
        except ValueError:
            if given:
                raise
            rank_zero_info(f"FORA: {self.who}'s probe batch ({label}) did not reach every target: not checked")
            return
        self.probe, self.probe_source, self.held_out = probe, label, held_out
        self._set_limits(subspaces)
        if held_out:
            with trainer.precision_plugin.forward_context():
                self._reference = self._base_logits(batches, forward, move)

    def _same_bases(self, modules: Mapping[str, nn.Module], subspaces: Mapping[str, LayerSubspace]) -> bool:
        """Whether this fit protects the same modules with the very bases the probe was captured under (a kept fit)."""
        p = self.probe
        return set(p.modules) == set(modules) and all(
            p.modules[n] is modules[n] and p.subspaces.get(n) is subspaces.get(n) for n in modules
        )

    def _probe_batches(self, trainer: Trainer, pl_module: LightningModule) -> tuple[str, Any, bool, bool]:
        """``(label, batches, held_out, given)`` of the first probe source that exists (module docstring)."""
        if self.source is not None:
            return "probe= loader (held out)", materialize(self.source), True, True
        loader = preserved_loader(trainer)
        if loader is not None:
            return "datamodule.preserve_val_dataloader() (held out)", loader, True, True
        holdout = getattr(self.owner, "holdout", None)
        # each rank holds its own share of the hold-out slice: probe it only if every rank has one (the probe's
        # forwards and readings are collectives), else every rank takes the first calibration batch
        if trainer.strategy.reduce_boolean_decision(bool(holdout), all=True):
            return (
                "calibration hold-out slice (every calibration_holdout-th batch; added back into the bases)",
                holdout[:1] if trainer.world_size > 1 else holdout,  # the ranks' shares differ: the same forwards
                True,
                False,
            )
        batches = calibration_slice(self.owner, trainer, pl_module)
        return "calibration slice (the first calibration batch, in-sample)", batches, False, False

    def _set_limits(self, subspaces: Mapping[str, LayerSubspace]) -> None:
        """Each layer's :class:`Limits` from its base output norms and the settings (``core.leakage``)."""
        config = self.config
        tau = getattr(config, "channel_bound", None)
        bounded = tau is not None and bool(getattr(self.owner, "bounds_channel", False))
        self.limits = {}
        for name in self.probe.held:
            nm, tol, r = self.probe.norms[name], self.probe.tolerance(name), subspaces[name].r
            t = 0.0 if r == 0 else tau if bounded else None
            has_span = self.probe.held[name].xq is not None
            self.limits[name] = Limits(
                tolerance=tol,
                span=span_bound(t, nm.span, nm.span_bias_free, tol) if t is not None and has_span else None,
                heldout=heldout_tolerance(t, nm.raw, nm.span_bias_free, nm.outside, tol),
            )

    @torch.no_grad()
    def _base_logits(self, loader: Iterable[Any], forward: Any, move: Any) -> list[tuple[dict[str, Tensor], Tensor]]:
        out = []
        for i, batch in enumerate(loader):
            if i >= self.report_batches:
                break
            logits = _logits(forward(move(batch))) if isinstance(batch, Mapping) else None
            if logits is None:
                return []
            out.append(({k: v for k, v in batch.items() if isinstance(v, Tensor)}, logits.float().cpu()))
        return out

    def step(self, trainer: Trainer) -> None:
        """A check after each ``log_every_n_steps``-th optimizer step (every rank reads; loggers write on rank 0)."""
        step = trainer.global_step
        every = max(int(trainer.log_every_n_steps), 1)
        if self.probe is None or step == self._last_step or step % every:
            return
        self._last_step = step
        self._log(trainer, self.check(trainer))

    def check(self, trainer: Trainer) -> dict[str, Reading]:
        """Read every layer, keep the worst readings, and act on the first one past its bound (module docstring)."""
        readings = self.probe.read()
        step = trainer.global_step
        self.checks += 1
        past = []
        for name, rd in readings.items():
            lim = self.limits[name]
            self._keep_worst("leakage", rd.leakage, name, step, lim.tolerance)
            self._keep_worst("span_change", rd.span, name, step, lim.span)
            self._keep_worst("heldout", rd.heldout, name, step, lim.heldout)
            if _exceeds(rd.leakage, lim.tolerance) or _exceeds(rd.span, lim.span):
                past.append(name)
        violated = trainer.strategy.reduce_boolean_decision(bool(past), all=False)
        if violated and self.violation is None:
            self._act(trainer, past, readings)
        return readings

    def _keep_worst(self, kind: str, value: float | None, layer: str, step: int, bound: float | None) -> None:
        """The reading of ``kind`` nearest its bound (the largest ``value / bound``; the largest value without one)."""
        if value is None:
            return
        score = value / bound if bound else value
        old = self.worst.get(kind)
        if old is None or not score <= old["score"]:
            self.worst[kind] = {"value": value, "layer": layer, "step": step, "bound": bound, "score": score}

    def _act(self, trainer: Trainer, past: list[str], readings: Mapping[str, Reading]) -> None:
        """Warn once (or raise) naming the worst layer past its bound, its value, the bound and the likely causes."""
        if not past:  # another rank saw it (DDP: different probe rows)
            self.violation = {"step": trainer.global_step, "layer": None}
            message = f"FORA: {self.who}'s leakage sentinel: another rank read a protected layer past its bound"
        else:
            name, kind, value, bound = self._worst_of(past, readings)
            causes = self.causes(trainer, name, readings[name])
            self.violation = {
                "step": trainer.global_step,
                "layer": name,
                "kind": kind,
                "value": value,
                "bound": bound,
                "causes": causes,
            }
            message = self._message(trainer, name, kind, value, bound, causes)
        if self.on_violation == "raise":
            raise ProtectionViolation(message)
        rank_zero_warn(message)

    def _worst_of(self, past: list[str], readings: Mapping[str, Reading]) -> tuple[str, str, float, float]:
        """``(layer, kind, value, bound)`` of the reading furthest past its bound among ``past``."""
        best: tuple[float, str, str, float, float] | None = None
        for name in past:
            rd, lim = readings[name], self.limits[name]
            for kind, value, bound in (("leakage", rd.leakage, lim.tolerance), ("span_change", rd.span, lim.span)):
                if _exceeds(value, bound):
                    score = value / bound if math.isfinite(value) and bound else math.inf
                    if best is None or score > best[0]:
                        best = (score, name, kind, value, bound)
        _, name, kind, value, bound = best
        return name, kind, value, bound

    def _message(self, trainer: Trainer, name: str, kind: str, value: float, bound: float, causes: list[str]) -> str:
        what = (
            "changed its output on span(Q), the inputs it protects, outside the spectral channel"
            if kind == "leakage"
            else "changed its output on span(Q), the inputs it protects"
        )
        dtype = str(self.probe.held[name].dtype).removeprefix("torch.")
        held = (
            f"the rounding slack of {dtype}"
            if kind == "leakage"
            else f"channel_bound={self.config.channel_bound:g} of the base output, plus the {dtype} slack"
        )
        listed = " ".join(f"({i}) {c}." for i, c in enumerate(causes, 1))
        action = (
            "(on_violation='raise' stopped the fit)"
            if self.on_violation == "raise"
            else "Reported once per fit (every reading: fora/leakage_max and fora_report); on_violation='raise' stops "
            "the fit instead"
        )
        return (
            f"FORA: {self.who}'s leakage sentinel: layer '{name}' {what} by {value:.3g} of ||f0(x)|| at step "
            f"{trainer.global_step}; certified bound {bound:.3g} ({held}). Likely cause{'s' * (len(causes) > 1)}: "
            f"{listed} {action}"
        )

    def causes(self, trainer: Trainer, name: str, reading: Reading) -> list[str]:
        """The likely causes of ``name``'s reading, with their fixes: those the run shows, else the undetectable ones."""
        probe, config, out = self.probe, self.config, []
        if probe.current(name) is None:
            out.append(
                f"layer '{name}' is gone from the model: it was removed or renamed after fit start. Fix: keep every "
                "protected layer in place during the fit"
            )
        elif probe.rebuilt(name):
            out.append(
                f"layer '{name}' was rebuilt or replaced after fit start (another module, or another weight Parameter, "
                "under its name): FORA protects the parameters it found at fit start. Fix: build every layer before "
                "trainer.fit (in __init__ or configure_model) and never replace a protected layer during training"
            )
        values = [v for v in (reading.leakage, reading.span, reading.heldout) if v is not None]
        if not all(math.isfinite(v) for v in values) and not out:
            out.append(
                "its outputs are no longer finite: training diverged (NaN/inf weights). Fix: lower the learning rate"
            )
        if reading.bias > probe.tolerance(name) and math.isfinite(reading.bias):
            out.append(
                f"its bias moved ({reading.bias:.3g} of ||f0(x)||): FORA constrains the weight, not the bias, which "
                "shifts every output (freeze_other=False, or a bias unfrozen by hand). Fix: freeze_other=True (the "
                "default), or requires_grad_(False) on the protected layers' biases"
            )
        if config is not None and config.mode == "gradient" and not is_lora(probe.modules[name]):
            algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
            if trainer.gradient_clip_val and str(algorithm) == "value":
                out.append(
                    "mode='gradient' with gradient_clip_algorithm='value': Lightning clips gradients after FORA "
                    "projects them (on_before_optimizer_step), clamping coordinates puts components back into span(Q), "
                    "and mode='gradient' never re-projects. Fix: mode='update' (the default), or "
                    "gradient_clip_algorithm='norm'"
                )
            for opt in trainer.optimizers:
                decay = any(g.get("weight_decay", 0.0) for g in opt.param_groups)
                if isinstance(opt, ADAPTIVE) or any("betas" in g for g in opt.param_groups) or decay:
                    out.append(
                        f"mode='gradient' with {type(opt).__name__}: a projected gradient stays in the protected set "
                        "only under plain SGD (elementwise scaling and weight decay leave it). Fix: mode='update' (the "
                        "default), or SGD without weight decay"
                    )
                    break
        dtype = probe.held[name].dtype
        if dtype in (torch.bfloat16, torch.float16):
            out.append(
                f"the layer's weights are {str(dtype).removeprefix('torch.')} (precision='bf16-true' / '16-true'): "
                "each step rounds W - W0 in that format, about 2^-8 of |W| per element. Fix: precision='bf16-mixed' "
                "(float32 weights, bf16 compute)"
            )
        if not out:
            out.append(
                "the weights moved outside optimizer.step: a hand-written update (in training_step, a callback or a "
                "hook), weights loaded into the model after fit start, or another callback writing them (EMA, SWA); "
                "FORA constrains only what optimizer.step does. Fix: change protected weights only through the "
                "optimizer; load weights before trainer.fit (or resume with ckpt_path=)"
            )
        return out

    def _log(self, trainer: Trainer, readings: Mapping[str, Reading]) -> None:
        """The readings to every attached logger (once per step)."""
        step = trainer.global_step
        if not trainer.loggers or step == self._logged_step:
            return
        self._logged_step = step
        leak = {n: r.leakage for n, r in readings.items() if r.leakage is not None}
        metrics = {"fora/leakage_heldout_max": max(r.heldout for r in readings.values())}
        if leak:
            metrics |= {"fora/leakage_max": max(leak.values()), "fora/leakage_mean": sum(leak.values()) / len(leak)}
        spans = [r.span for r in readings.values() if r.span is not None]
        if spans:
            metrics["fora/span_change_max"] = max(spans)
        every = max(int(trainer.log_every_n_steps), 1)
        if (step // every) % self.per_layer_every == 0:
            metrics.update({f"fora/leakage/{n}": v for n, v in leak.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def finish(
        self, trainer: Trainer, pl_module: LightningModule, subspaces: Mapping[str, LayerSubspace]
    ) -> Path | None:
        """The end-of-fit check (with or without a logger), then ``fora_report.{json,md}`` in ``trainer.log_dir``
        (rank 0, with a logger); returns the JSON path there."""
        readings = self.check(trainer) if self.probe is not None else {}
        if readings:
            self._log(trainer, readings)
        model_metrics = self._model_metrics(trainer, pl_module) if self._reference else {}
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        if not trainer.loggers or log_dir is None or not trainer.is_global_zero:  # logger=False: nothing in the cwd
            return None
        leakage = {n: r.leakage for n, r in readings.items() if r.leakage is not None}
        summary = {
            "who": self.who,
            "step": trainer.global_step,
            "probe_rows": self.rows,
            "probe_inputs": self.probe_source,
            "held_out": self.held_out,
            **model_metrics,
            **self.summary(),
            **({"calibration": self.calibration} if self.calibration else {}),
        }
        if leakage:
            summary.update(leakage_max=max(leakage.values()), leakage_mean=sum(leakage.values()) / len(leakage))
        extra = {
            n: {
                "span_change": r.span,
                "span_bound": self.limits[n].span,
                "leakage_heldout": r.heldout,
                "heldout_tolerance": self.limits[n].heldout,
            }
            for n, r in readings.items()
        }
        return write_report(Path(log_dir), summary, layer_rows(subspaces, leakage, extra))

    def summary(self) -> dict[str, Any]:
        """The sentinel's part of the report: source, size, checks, worst readings and their bounds, the verdict."""
        worst = {k: {f: v for f, v in w.items() if f != "score"} for k, w in self.worst.items()}
        out: dict[str, Any] = {
            "sentinel_checks": self.checks,
            "probe_bytes": self.probe.nbytes() if self.probe is not None else 0,
            "on_violation": self.on_violation,
            "verdict": "not checked" if not self.checks else "violated" if self.violation else "ok",
        }
        for kind in ("leakage", "span_change", "heldout"):
            if kind in worst:
                out[f"worst_{kind}"] = worst[kind]
        if self.violation is not None:
            out["violation"] = dict(self.violation)
        return out

    def _model_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """``KL(base || tuned)`` per token, tuned and base perplexity on the stored reference batches."""
        from fora_lightning.metrics import (  # torchmetrics, loaded when the report first needs it
            CausalPerplexity,
            TokenKL,
        )

        kl, ppl, ppl_base = (m(sync_on_compute=False) for m in (TokenKL, CausalPerplexity, CausalPerplexity))
        forward = calibration_forward(pl_module, trainer.strategy.model)
        flags = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                for batch, base in self._reference:
                    dev = trainer.strategy.batch_to_device(batch)
                    tuned = _logits(forward(trainer.precision_plugin.convert_input(dev))).float().cpu()
                    mask, labels = batch.get("attention_mask"), batch.get("labels")
                    kl.update(base, tuned, mask)
                    ppl.update(tuned, batch["input_ids"], mask, labels)
                    ppl_base.update(base, batch["input_ids"], mask, labels)
        finally:
            for m, flag in flags.items():
                m.training = flag
        return {
            "kl": float(kl.compute()),
            "ppl": float(ppl.compute()),
            "ppl_base": float(ppl_base.compute()),
            "report_batches": len(self._reference),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        worst = {k: dict(v) for k, v in self.worst.items()}
        return {"version": 2, "layers": self.probe.state_dict(), "source": self.probe_source, "worst": worst}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored = dict(state) if state and "version" in state else None
