"""The leakage sentinel: it fires, naming the right cause, on injected violations of each kind, and stays silent
on clean runs (FORA, update-only, gradient mode with plain SGD, FORA-LoRA, bf16-true) -- with or without a logger."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import D_HID, D_IN, MLP, calibration_loader, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback
from reference import orthonormal
from torch import nn

from fora_lightning import FORA, ForaConfig, ForaLoRA, ProtectionViolation
from fora_lightning.core.leakage import channel_residual, heldout_tolerance, span_bound, span_part
from fora_lightning.core.subspace import complement_basis

TARGETS = ["fc1", "fc2"]


# ------------------------------------------------------------------------------------------ the math
@settings(max_examples=30, deadline=None)
@given(d_out=st.integers(2, 10), d_in=st.integers(2, 10), n=st.integers(1, 12), data=st.data())
def test_channel_residual_matches_dense_least_squares(d_out: int, d_in: int, n: int, data) -> None:
    """``diff - (X_Q V) diag(delta_hat) U^T`` with ``delta_hat`` the per-column least-squares fit, in float64; zero
    for an update in S (any delta), and ``||diff|| <= tau ||X_Q W0^T||`` once ``|delta_i| <= tau S_i``."""
    k = data.draw(st.integers(1, d_in))
    r = data.draw(st.integers(0, min(d_out, d_in)))
    complement = data.draw(st.booleans()) and k < d_in
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in * 100 + n * 10 + k + r)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, s_all, vh = torch.linalg.svd(w0, full_matrices=False)
    u, s, v = u_all[:, :r], s_all[:r], vh[:r].T
    q = orthonormal(d_in, k, gen)
    basis = complement_basis(q) if complement else q
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    xq = span_part(x, basis, complement)
    torch.testing.assert_close(xq, x @ q @ q.T, rtol=0, atol=1e-10)
    # an arbitrary update: the residual is the dense least-squares one
    d = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    diff = xq @ d.T
    got = channel_residual(diff, xq, u, v)
    a, b = diff @ u, xq @ v
    den = (b * b).sum(0)
    delta = torch.where(den > 1e-300, (a * b).sum(0) / den, torch.zeros_like(den))
    torch.testing.assert_close(got, diff - (b * delta) @ u.T, rtol=0, atol=1e-10)
    # an update in S with a bounded channel: no residual, and the span change within tau ||X_Q W0^T||
    tau = 0.1
    p_u = torch.eye(d_out, dtype=torch.float64) - u @ u.T
    p_q = torch.eye(d_in, dtype=torch.float64) - q @ q.T
    chan = tau * s * (2 * torch.rand(r, generator=gen, dtype=torch.float64) - 1)
    d_s = p_u @ torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) @ p_q + u @ torch.diag(chan) @ v.T
    diff_s = xq @ d_s.T
    assert channel_residual(diff_s, xq, u, v).norm() <= 1e-10 * (1 + diff_s.norm())
    b0 = torch.randn(d_out, generator=gen, dtype=torch.float64)
    y0 = xq @ w0.T + b0
    bound = span_bound(tau, float(y0.norm()), float((xq @ w0.T).norm()), 0.0)
    assert float(diff_s.norm() / y0.norm()) <= bound + 1e-12


def test_heldout_tolerance_holds_for_an_update_no_larger_than_the_base_response():
    """On raw rows X = X_Q + X_perp, an update in S with |delta| <= tau S and ||X_perp D^T|| <= ||X_perp W0^T|| stays
    within :func:`heldout_tolerance`; an unbounded channel states none."""
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k, r, tau = 6, 8, 3, 2, 0.05
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, s_all, vh = torch.linalg.svd(w0, full_matrices=False)
    u, s, v = u_all[:, :r], s_all[:r], vh[:r].T
    q = orthonormal(d_in, k, gen)
    x = torch.randn(16, d_in, generator=gen, dtype=torch.float64)
    xq = x @ q @ q.T
    p_u, p_q = torch.eye(d_out, dtype=torch.float64) - u @ u.T, torch.eye(d_in, dtype=torch.float64) - q @ q.T
    m = p_u @ torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) @ p_q
    m *= ((x - xq) @ w0.T).norm() / ((x - xq) @ m.T).norm()  # as large as the base response on X_perp
    d = m + u @ torch.diag(tau * s) @ v.T
    raw0 = x @ w0.T
    tol = heldout_tolerance(tau, float(raw0.norm()), float((xq @ w0.T).norm()), float(((x - xq) @ w0.T).norm()), 0.0)
    assert float((x @ d.T).norm() / raw0.norm()) <= tol + 1e-12
    assert heldout_tolerance(None, 1.0, 1.0, 1.0, 0.0) is None


# ------------------------------------------------------------------------------------------ injected violations
class SGDMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class HandWrittenStep(Callback):
    """Adds noise to fc1's weight after every optimizer step, outside ``optimizer.step`` (listed before FORA)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.fc1.weight.add_(0.1 * torch.randn_like(pl_module.fc1.weight))


class Rebuild(Callback):
    """Replaces fc1 by a freshly initialised ``nn.Linear`` after the first step (a 're-built' layer)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            pl_module.fc1 = nn.Linear(D_IN, D_HID)


def _fit(model, fora, *before: Callback, **trainer_kwargs):
    """Fit; returns the ``FORA:`` warnings raised during it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = {"max_steps": 20, "log_every_n_steps": 5, **trainer_kwargs}
        tiny_trainer(callbacks=[*before, fora], **kwargs).fit(model, task_loader())
    return [str(w.message) for w in caught if str(w.message).startswith("FORA:")]


def _sentinel(messages: list[str]) -> list[str]:
    return [m for m in messages if "leakage sentinel" in m]


def _fora(**settings):
    return FORA(calibration=calibration_loader(), target_modules=TARGETS, weight_rank=2, progress=False, **settings)


def test_gradient_mode_with_value_clipping_is_caught_and_named(mlp):
    torch.manual_seed(0)
    fora = _fora(mode="gradient", channel_bound=None)
    fired = _sentinel(_fit(SGDMLP(), fora, gradient_clip_val=0.01, gradient_clip_algorithm="value"))
    assert len(fired) == 1, fired  # once per fit
    assert "gradient_clip_algorithm='value'" in fired[0] and "layer 'fc" in fired[0] and "certified bound" in fired[0]
    v = fora.protection.monitor.violation
    assert v["value"] > v["bound"] and v["bound"] == pytest.approx(1e-5)
    assert fora.protection.monitor.summary()["verdict"] == "violated"


def test_on_violation_raise_stops_the_fit():
    torch.manual_seed(0)
    fora = _fora(mode="gradient", channel_bound=None, on_violation="raise")
    with pytest.raises(ProtectionViolation, match="gradient_clip_algorithm='value'"):
        _fit(SGDMLP(), fora, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert fora.protection.monitor.violation["step"] == 5  # the first check


def test_a_hand_written_step_is_caught_even_in_a_short_run_without_a_logger(mlp):
    """max_steps (3) < log_every_n_steps (50), logger=False: the end-of-fit check still runs, once."""
    fora = _fora()
    fired = _sentinel(_fit(mlp, fora, HandWrittenStep(), max_steps=3, log_every_n_steps=50))
    assert len(fired) == 1 and "outside optimizer.step" in fired[0] and "rebuilt" not in fired[0]
    assert "channel_bound=0.05" in fired[0] or "outside the spectral channel" in fired[0]
    assert fora.protection.monitor.checks == 1


def test_a_rebuilt_layer_is_caught_and_named(mlp):
    fora = _fora()
    fired = _sentinel(_fit(mlp, fora, Rebuild(), max_steps=10))
    assert len(fired) == 1 and "layer 'fc1' was rebuilt or replaced" in fired[0]


def test_a_trained_bias_is_named(mlp):
    fora = _fora(freeze_other=False)
    fired = _sentinel(_fit(mlp, fora))
    assert len(fired) == 1 and "its bias moved" in fired[0] and "freeze_other=True" in fired[0]


def test_on_violation_off_keeps_no_probe_and_checks_nothing(mlp):
    """The same violating run as above, sentinel off: no probe rows, no reading, the report says not checked."""
    torch.manual_seed(0)
    fora = _fora(mode="gradient", channel_bound=None, on_violation="off")
    fired = _sentinel(_fit(SGDMLP(), fora, gradient_clip_val=0.01, gradient_clip_algorithm="value"))
    monitor = fora.protection.monitor
    assert fired == [] and monitor.probe is None and monitor.checks == 0
    summary = monitor.summary()
    assert summary["verdict"] == "not checked" and monitor.probe_source == "off" and summary["on_violation"] == "off"


def test_on_violation_is_checked():
    with pytest.raises(ValueError, match="on_violation must be 'warn', 'raise' or 'off'"):
        ForaConfig(on_violation="ignore")


# ------------------------------------------------------------------------------------------ clean runs
class BF16MLP(MLP):
    def configure_optimizers(self):  # AdamW with a small lr: bf16-true rounding, not a diverging run
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)


CLEAN = {
    "fora": (MLP, lambda: _fora(), {}),
    "update_only": (MLP, lambda: _fora(project_gradients=False), {}),
    "unbounded_channel": (MLP, lambda: _fora(channel_bound=None), {}),
    "gradient_sgd": (SGDMLP, lambda: _fora(mode="gradient", channel_bound=None), {}),
    "gradient_clip_norm": (
        SGDMLP,
        lambda: _fora(mode="gradient", channel_bound=None),
        {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "norm"},
    ),
    "fora_lora": (
        MLP,
        lambda: ForaLoRA(calibration=calibration_loader(), target_modules=TARGETS, weight_rank=2, progress=False),
        {},
    ),
    "bf16_true": (BF16MLP, lambda: _fora(), {"precision": "bf16-true"}),
    # the probe is captured inside the training forward's autocast: X_Q must still be computed in float32
    "bf16_mixed": (MLP, lambda: _fora(), {"precision": "bf16-mixed"}),
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_runs_raise_no_fora_warning_and_are_checked(name):
    """Not one ``FORA:`` warning in a clean run; the sentinel did check (every 5 steps and at the end) on the
    calibration slice (no probe=, no datamodule), with every reading within its bound."""
    model_cls, make, kwargs = CLEAN[name]
    torch.manual_seed(0)
    fora = make()
    messages = _fit(model_cls(), fora, max_steps=20, **kwargs)
    assert messages == []
    monitor = fora.protection.monitor
    summary = monitor.summary()
    assert summary["verdict"] == "ok" and monitor.checks == 5  # steps 5, 10, 15, 20 and the end
    assert monitor.probe_source.startswith("calibration")  # the hold-out slice (or the first batch without one)
    assert summary["worst_leakage"]["value"] <= summary["worst_leakage"]["bound"]
    if "worst_span_change" in summary and summary["worst_span_change"]["bound"] is not None:
        assert summary["worst_span_change"]["value"] <= summary["worst_span_change"]["bound"]
