"""Protection in the logger: the leakage probe every ``log_every_n_steps`` and the end-of-fit proof table.

:class:`ProtectionMonitor` is held by both Callbacks (through :class:`~fora_lightning.protection.Protection`):

* ``start`` (``on_train_start``, weights still ``W0``): the probe's inputs come from the first batch of the
  held-out preserved loader (``trainer.datamodule.preserve_val_dataloader()``, rows ``TextDataModule`` keeps out
  of calibration, not used for the covariances). Without one there is no probe (calibration rows would be
  in-sample), and the report holds the bases only.
  With a held-out loader the base model's logits on its first ``report_batches`` batches are kept on the CPU
  (float32, ``tokens x vocab``): the cheapest exact reference for ``KL(base || tuned)``, since FORA keeps no copy
  of ``W0`` (one extra forward pass per batch, no second model in memory).
* ``step`` (``on_train_batch_end``): ``fora/leakage_max`` and ``fora/leakage_mean`` to every attached logger each
  ``trainer.log_every_n_steps`` optimizer steps, ``fora/leakage/<layer>`` every ``per_layer_every`` times that.
* ``finish`` (``on_train_end``): ``fora_report.json`` and ``fora_report.md`` in ``trainer.log_dir`` (rank 0; with a logger).

Every rank runs the same batches (forwards are collectives under FSDP), so the metrics need no cross-rank sum.
A run resumed from a checkpoint restores the probe's inputs (saved with the bases); the base logits are not
saved, so its report has no KL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from fora_lightning.calibration import calibration_forward, materialize
from fora_lightning.core.distributed import row_shard
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.fora_report import layer_rows, write_report
from fora_lightning.probe import ProtectionProbe, is_lora


def preserved_loader(trainer: Trainer) -> Iterable[Any] | None:
    """``trainer.datamodule.preserve_val_dataloader()`` when the datamodule has one (and it is not ``None``)."""
    fn = getattr(trainer.datamodule, "preserve_val_dataloader", None)
    return fn() if callable(fn) else None


def _base(m: nn.Module) -> Tensor:
    return m.base_layer.weight if is_lora(m) else m.weight


def _logits(out: Any) -> Tensor | None:
    logits = getattr(out, "logits", out)
    return logits if isinstance(logits, Tensor) and logits.dim() == 3 else None


class ProtectionMonitor:
    """The probe and the report of one fit (``rows`` probe tokens per layer; ``report_batches`` preserved batches)."""

    def __init__(self, who: str, rows: int = 64, per_layer_every: int = 10, report_batches: int = 4) -> None:
        self.who = who
        self.rows, self.per_layer_every, self.report_batches = rows, per_layer_every, report_batches
        self.probe: ProtectionProbe | None = None
        self.held_out = False
        self._reference: list[tuple[dict[str, Tensor], Tensor]] = []  # (batch on CPU, base logits on CPU)
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        self.source: Any = None  # the Callback's ``probe=`` loader (else the datamodule's preserve_val_dataloader)
        self.calibration: dict[str, Any] = {}  # capability -> the calibration sufficiency summary (core/sufficiency.py)

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        modules: Mapping[str, nn.Module],
        subspaces: Mapping[str, LayerSubspace],
    ) -> None:
        """Keep the probe's inputs (or restore them) and, with a held-out loader, the base logits."""
        self.probe, self._reference, self._last_step = None, [], trainer.global_step
        if self.rows <= 0:
            return
        if any(is_lora(m) and row_shard(_base(m)) is not None for m in modules.values()):
            rank_zero_warn(
                f"FORA: {self.who}'s leakage probe is off for FORA-LoRA layers sharded by FSDP2 (not implemented)"
            )
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            rank_zero_warn(f"FORA: {self.who}'s leakage probe is off under FSDP1 (flat parameters): use FSDP2 or DDP")
            return
        probe = ProtectionProbe(modules, subspaces)
        if self._restored is not None:
            probe.load_state_dict(self._restored)
            self.probe, self._restored = probe, None
            return
        if trainer.global_step > 0:
            rank_zero_warn(f"FORA: {self.who} resumed without the probe's inputs in the checkpoint: no leakage probe")
            return
        forward = calibration_forward(pl_module, trainer.strategy.model)

        def move(b: Any) -> Any:
            return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(b))

        loader = self._held_out_loader(trainer)
        if loader is None:  # no held-out inputs: drawing calibration batches again would be in-sample (and extra I/O)
            rank_zero_info(
                f"FORA: {self.who} logs no leakage probe: it needs held-out inputs of the kept capability. Give the "
                "Callback probe=<a loader of them>, or define datamodule.preserve_val_dataloader()"
            )
            return
        self.held_out = True
        with trainer.precision_plugin.forward_context():
            probe.capture(trainer.strategy.model, (move(b) for b in loader), forward, self.rows)
            self._reference = self._base_logits(trainer, loader, forward, move)
        self.probe = probe

    def _held_out_loader(self, trainer: Trainer) -> Iterable[Any] | None:
        """The ``probe=`` source (called if it is a factory), else :func:`preserved_loader`."""
        return preserved_loader(trainer) if self.source is None else materialize(self.source)

    @torch.no_grad()
    def _base_logits(
        self, trainer: Trainer, loader: Iterable[Any], forward: Any, move: Any
    ) -> list[tuple[dict[str, Tensor], Tensor]]:
        out = []
        for i, batch in enumerate(loader):
            if i >= self.report_batches:
                break
            logits = _logits(forward(move(batch)))
            if logits is None:
                return []
            out.append(({k: v for k, v in batch.items() if isinstance(v, Tensor)}, logits.float().cpu()))
        return out

    def step(self, trainer: Trainer) -> None:
        """Log the probe after each ``log_every_n_steps``-th optimizer step (every rank computes; loggers write on rank 0)."""
        step = trainer.global_step
        every = max(int(trainer.log_every_n_steps), 1)
        if self.probe is None or step == self._last_step or step % every:
            return
        self._last_step = step
        leak = self.probe.leakage()
        values = list(leak.values())
        metrics = {"fora/leakage_max": max(values), "fora/leakage_mean": sum(values) / len(values)}
        if (step // every) % self.per_layer_every == 0:
            metrics.update({f"fora/leakage/{n}": v for n, v in leak.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def finish(
        self, trainer: Trainer, pl_module: LightningModule, subspaces: Mapping[str, LayerSubspace]
    ) -> Path | None:
        """Write ``fora_report.{json,md}`` into ``trainer.log_dir`` (rank 0); returns the JSON path there."""
        leakage = self.probe.leakage() if self.probe is not None else {}
        model_metrics = self._model_metrics(trainer, pl_module) if self._reference else {}
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        if not trainer.loggers or log_dir is None or not trainer.is_global_zero:  # logger=False: nothing in the cwd
            return None
        summary = {
            "who": self.who,
            "step": trainer.global_step,
            "probe_rows": self.rows,
            "probe_inputs": "held-out preserved batch" if self.held_out else "none (no preserve_val_dataloader)",
            "held_out": self.held_out,
            **model_metrics,
            **({"calibration": self.calibration} if self.calibration else {}),
        }
        if leakage:
            summary.update(leakage_max=max(leakage.values()), leakage_mean=sum(leakage.values()) / len(leakage))
        return write_report(Path(log_dir), summary, layer_rows(subspaces, leakage))

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
        return self.probe.state_dict() if self.probe is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored = dict(state) if state else None
