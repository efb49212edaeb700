"""``precision``: every arithmetic the CPU runs keeps the guarantee after 200 AdamW steps; ``auto`` resolves as documented."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_loader, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_pi, orthonormal
from torch.utils.data import DataLoader

from fora_lightning import FORA, ForaConfig
from fora_lightning.core.precision import LEAK_TOLERANCE, project_cheap, project_weight_mixed_, resolve_precision, weight_coords
from fora_lightning.core.projection import relative_leakage, right_project


def _leak(cb: FORA, name: str, tuned: torch.nn.Linear, w0: torch.Tensor, x: torch.Tensor) -> float:
    sub = cb.subspaces[name]
    d = (tuned.weight.detach() - w0).double()
    u, v = sub.u.double(), sub.v.double()
    return relative_leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0, x)


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16", "auto"])
def test_200_adamw_steps_keep_span_leakage_below_1e5(mlp, precision):
    base = copy.deepcopy(mlp)
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1", "fc2"], weight_rank=2, energy=0.999, precision=precision, progress=False)
    tiny_trainer(max_steps=200, callbacks=[cb]).fit(mlp, task_loader())
    assert cb.precision == resolve_precision(precision, "cpu")
    x = span_inputs(300, seed=9)  # held out, from the calibration span
    assert float((mlp.fc1.weight - base.fc1.weight).norm() / base.fc1.weight.norm()) > 0.5  # it trained
    assert _leak(cb, "fc1", mlp.fc1, base.fc1.weight.detach(), x) < 1e-5


def test_tiny_llama_bf16_keeps_span_leakage_below_1e5():
    from test_callback_llm import VOCAB, TinyLM, _batches, _layer_inputs

    base = TinyLM()
    model = copy.deepcopy(base)
    calibration = _batches(6, seed=1, low=0, high=VOCAB // 2, pad=True)
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]
    cb = FORA(calibration=calibration, target_modules=["q_proj", "o_proj", "down_proj"], weight_rank=4, precision="bf16", progress=False)
    tiny_trainer(max_steps=200, callbacks=[cb]).fit(model, DataLoader(train, batch_size=None))
    held = _layer_inputs(base, _batches(3, seed=7, low=0, high=VOCAB // 2), list(cb.protection.targets))
    mods = dict(base.named_modules())
    for name, module in cb.protection.targets.items():
        x = held[name].double()
        x_span = x - right_project(x, cb.subspaces[name].basis.double())
        w0 = mods[name].weight.detach()
        assert float((module.weight.detach() - w0).norm() / w0.norm()) > 0.05, name
        assert _leak(cb, name, module, w0, x_span) < 1e-5, name


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
@given(d_out=st.integers(4, 40), d_in=st.integers(4, 40), frac=st.floats(0.1, 0.9), r=st.integers(0, 3), precision=st.sampled_from(["tf32", "bf16"]))
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
        small = 2 * 2.0**-8 * float((w @ q - a0).norm()) <= LEAK_TOLERANCE * float(a0.norm())
        assert small == (scale < 1e-2) or scale < 1e-2
        project_weight_mixed_(w, q, a0, u, v, b0, precision="bf16")
        d = (w - w0).double()
        ud, vd = u.double(), v.double()
        leak = relative_leakage(d - ud @ torch.diag(torch.diag(ud.T @ d @ vd)) @ vd.T, w0, x)
        assert leak < 1e-5, scale
