"""``precision``: every arithmetic the CPU runs keeps the guarantee after 200 AdamW steps; ``auto`` resolves as documented."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_loader, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning import FORA, ForaConfig
from fora_lightning.core.precision import (
    LEAK_TOLERANCE,
    project_cheap,
    project_weight_mixed_,
    resolve_precision,
    weight_coords,
)
from fora_lightning.core.projection import right_project
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import (
    LayerSubspace,
    SubspaceConfig,
    build_subspace,
    spectrum,
)
from fora_lightning.layout import TargetLayout
from fora_lightning.metrics import leakage as relative_leakage


def _leak(sub: LayerSubspace, tuned: torch.nn.Linear, w0: torch.Tensor, x: torch.Tensor) -> float:
    d = (tuned.weight.detach() - w0).double()
    u, v = sub.u.double(), sub.v.double()
    return relative_leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0, x)


def _train(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Linear],
    subs: dict,
    batches: list,
    loss,
    precision: str,
    steps: int = 200,
) -> None:
    """``steps`` AdamW steps (weight decay 0.1) with FORA's per-step work in ``precision``, as the Callback runs it."""
    layout = TargetLayout(targets, model)
    layout.attach_anchors(subs)
    opt = torch.optim.AdamW([m.weight for m in targets.values()], lr=3e-3, weight_decay=0.1)
    for i in range(steps):
        opt.zero_grad()
        loss(model, batches[i % len(batches)]).backward()
        layout.project_grads(subs, precision)
        opt.step()
        layout.reproject(subs, precision)


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16", "auto"])
def test_200_adamw_steps_keep_span_leakage_below_1e5(mlp, precision):
    resolved = resolve_precision(precision, "cpu")
    targets = {"fc1": mlp.fc1, "fc2": mlp.fc2}
    w0 = {n: m.weight.detach().clone() for n, m in targets.items()}
    calib = torch.cat([x for x in calibration_loader()])
    cov = {"fc1": calib.T @ calib / len(calib), "fc2": None}
    h = torch.tanh(mlp.fc1(calib)).detach()
    cov["fc2"] = h.T @ h / len(h)
    subs = {n: build_subspace(n, w0[n], SubspaceConfig(energy=0.999, weight_rank=2), spectrum(cov[n])) for n in targets}
    batches = list(task_loader())
    _train(mlp, targets, subs, batches, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), resolved)
    x = span_inputs(300, seed=9)  # held out, from the calibration span
    assert float((mlp.fc1.weight - w0["fc1"]).norm() / w0["fc1"].norm()) > 0.5  # it trained
    assert _leak(subs["fc1"], mlp.fc1, w0["fc1"], x) < 1e-5


def test_tiny_llama_keeps_span_leakage_below_1e5_in_bf16():
    from test_callback_llm import protected_tiny_llama

    model, names, targets, w0, held, subs, train = protected_tiny_llama()
    _train(model, targets, subs, train, lambda m, b: m.training_step(b, 0), "bf16")
    for n in names:
        x = held[n].double()
        x_span = x - right_project(x, subs[n].basis.double())
        assert float((targets[n].weight.detach() - w0[n]).norm() / w0[n].norm()) > 0.05, n
        assert _leak(subs[n], targets[n], w0[n], x_span) < 1e-5, n


def test_callback_resolves_auto_at_train_start(mlp):
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], weight_rank=2, energy=0.999, progress=False)
    tiny_trainer(max_steps=3, callbacks=[cb]).fit(mlp, task_loader())
    assert cb.config.precision == "auto" and cb.precision == resolve_precision("auto", "cpu")


def test_auto_resolves_as_documented(monkeypatch):
    assert ForaConfig().precision == "auto"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu", mode="gradient") == "float32"
    assert resolve_precision("bf16", "cpu", flat=True) == "float32"
    assert resolve_precision("tf32", "cpu") == "float32"
    assert resolve_precision("bf16", "cpu", mode="gradient") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision"):
        ForaConfig(precision="fp16")


@settings(max_examples=15, deadline=None)
@given(
    d_out=st.integers(4, 40),
    d_in=st.integers(4, 40),
    frac=st.floats(0.1, 0.9),
    r=st.integers(0, 3),
    precision=st.sampled_from(["tf32", "bf16"]),
)
def test_cheap_projection_and_compensated_coords_against_float64(d_out, d_in, frac, r, precision):
    gen = torch.Generator().manual_seed(d_out * 100 + d_in)
    k = max(1, int(frac * d_in))
    r = min(r, d_out, d_in)
    q, u, v = orthonormal(d_in, k, gen), orthonormal(d_out, r, gen), orthonormal(d_in, r, gen)
    g = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    ref = dense_pi(g, q, u, v)
    got = project_cheap(g.float(), q.float(), u.float(), v.float(), precision=precision).double()
    assert float((got - ref).norm() / g.norm()) < 20 * 2.0**-8  # bf16/tf32-sized error on the gradient
    wq = weight_coords(g.float(), q.float(), precision, split=True).double()
    assert float((wq - g @ q).norm() / (g @ q).norm()) < 3e-5  # ~u^2: float32-grade, not u
    if precision == "tf32":
        assert float((wq - g @ q).norm() / (g @ q).norm()) < 1e-6


def test_mixed_reprojection_restores_feasibility_and_falls_back_on_large_leaks():
    gen = torch.Generator().manual_seed(3)
    d_out, d_in, k, r = 48, 32, 12, 2
    q, u, v = orthonormal(d_in, k, gen).float(), orthonormal(d_out, r, gen).float(), orthonormal(d_in, r, gen).float()
    w0 = torch.randn(d_out, d_in, generator=gen)
    a0, b0 = w0 @ q, u.T @ w0
    x = torch.randn(200, k, generator=gen, dtype=torch.float64) @ q.double().T
    for scale in (1e-4, 1e-1):  # small step: cheap (D Q) Q^T; large: 2u||DQ|| > tol ||A0||, float32 path
        w = w0 + scale * torch.randn(d_out, d_in, generator=gen)
        assert (2 * 2.0**-8 * float((w @ q - a0).norm()) <= LEAK_TOLERANCE * float(a0.norm())) == (scale < 1e-2)
        project_weight_mixed_(w, q, a0, u, v, b0, precision="bf16")
        d = (w - w0).double()
        ud, vd = u.double(), v.double()
        leak = relative_leakage(d - ud @ torch.diag(torch.diag(ud.T @ d @ vd)) @ vd.T, w0, x)
        assert leak < 1e-5, scale
