"""Precision: bf16-mixed, 16-mixed with a real GradScaler that skips steps, and bf16-true (single process, CPU).

Lightning turns ``precision="16-mixed"`` on CPU into bf16-mixed (with a warning), so the 16-mixed test passes
Lightning's ``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` plugin explicitly: fp16 autocast and
a GradScaler whose huge initial scale overflows the first steps, which the scaler then skips.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from tests.distributed import _worker as W


def _leakage(net: W.Net, fora, w0: W.Net) -> float:
    """max over layers of ``||P_U (W - W0) X|| / ||W0 X||``, X in span(Q) (held-out mixtures of the basis)."""
    worst = 0.0
    for name in ("fc1", "fc2"):
        sub = fora.subspaces[name]
        d = getattr(net, name).weight.detach().double() - getattr(w0, name).weight.detach().double()
        u = sub.u.double()
        pd = d - u @ (u.T @ d)
        x = (
            torch.randn(64, sub.basis.shape[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            @ sub.basis.double().T
        )
        worst = max(worst, float((x @ pd.T).norm() / (x @ getattr(w0, name).weight.detach().double().T).norm()))
    return worst


def _fit(steps: int, callbacks: list, **trainer_kwargs) -> W.Net:
    net = W.initial_net()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(net, W.task_loader(1))
    return net


class _CountingFORA(W.FORA):
    """Counts the post-step re-projections and records the weights' dtype seen by the gradient projection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reprojections = 0
        self.grad_dtypes: set[torch.dtype] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grad_dtypes.update(
            m.weight.grad.dtype for m in self.protection.targets.values() if m.weight.grad is not None
        )
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:  # reprojection='anchors'
        self.reprojections += 1
        super()._after_optimizer_step(optimizer, args, kwargs)

    def _install(self, trainer) -> None:  # reprojection='step' (the default): count the layer-by-layer steps
        super()._install(trainer)
        for step in self._steps:
            done = step.done

            def counted(done=done) -> None:
                self.reprojections += 1
                if done is not None:
                    done()

            step.done = counted


def _counting_fora() -> _CountingFORA:
    return _CountingFORA(
        calibration=W.calibration_loader(),
        target_modules=["fc1", "fc2"],
        rank={"fc1": W.SPAN, "fc2": 8},
        weight_rank=2,
        progress=False,
    )


class _StepWatcher(pl.Callback):
    """Counts batches after which the target weights really changed (steps the optimizer took)."""

    def __init__(self) -> None:
        self.taken = self.skipped = 0
        self._before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = pl_module.fc1.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.equal(self._before, pl_module.fc1.weight.detach()):
            self.skipped += 1
        else:
            self.taken += 1


def test_bf16_mixed_projects_float32_grads_exactly():
    fora = _counting_fora()
    net = _fit(12, [fora], precision="bf16-mixed")
    assert fora.grad_dtypes == {torch.float32}
    assert net.fc1.weight.dtype == torch.float32
    assert fora.reprojections == 12
    assert _leakage(net, fora, W.initial_net()) < 1e-5


def test_16_mixed_skipped_steps_are_neither_projected_stale_nor_reprojected():
    """GradScaler skips the overflowing steps: no weight change and no re-projection there; one re-projection
    per step taken; the guarantee holds after training."""
    fora, watch = _counting_fora(), _StepWatcher()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 grads overflow until the scale backs off
    net = _fit(40, [fora, watch], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert watch.skipped >= 3, f"expected overflow-skipped steps, got {watch.skipped}"
    assert watch.taken >= 5, f"expected real steps, got {watch.taken}"
    assert fora.reprojections == watch.taken
    assert _leakage(net, fora, W.initial_net()) < 1e-5


def test_bf16_true_keeps_bf16_weights_and_leaks_only_rounding():
    """Projection in float32, cast back to bf16: the leak is bf16 rounding (~1e-3 after some steps), not the update."""
    fora = _counting_fora()
    net = _fit(30, [fora], precision="bf16-true")
    assert net.fc1.weight.dtype == torch.bfloat16 and fora.grad_dtypes == {torch.bfloat16}
    w0 = W.initial_net().to(torch.bfloat16)
    moved = float((net.fc1.weight.double() - w0.fc1.weight.double()).norm() / w0.fc1.weight.double().norm())
    leak = _leakage(net, fora, w0)
    assert moved > 0.05, "bf16-true run did not train"
    assert leak < 2e-2 * moved, f"leakage {leak:.2e} is not small next to the update {moved:.2e}"
