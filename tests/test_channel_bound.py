"""The bounded spectral channel (``channel_bound = tau``): ``|delta_i| <= tau S_i`` after every step, hence
``||(W - W0) x|| <= tau ||W0 x||`` for every x in span(Q); measured on held-out span inputs after 150 AdamW steps
at a high learning rate (MLP and tiny Llama, FORA and FORA-LoRA), and shown to fail without the bound."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_loader, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal
from test_callback_llm import _batches
from test_training_modes import VOCAB, TinyLM
from torch.utils.data import DataLoader

from fora_lightning import FORA, ForaConfig, ForaLoRA
from fora_lightning.core.projection import anchors, bound_channel, project_weight_
from fora_lightning.core.subspace import LayerSubspace, complement_basis, format_summary
from fora_lightning.core.subspace_file import read_metadata
from fora_lightning.lora import fora_lora_layers

TAU = 0.05
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ the math
def test_bound_channel_clamps_into_the_box():
    delta = torch.tensor([0.3, -0.3, 0.01, -0.02], dtype=torch.float64)
    s = torch.tensor([2.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    out = bound_channel(delta, s, 0.1)
    torch.testing.assert_close(out, torch.tensor([0.2, -0.2, 0.01, -0.01], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(bound_channel(delta, s, 0.0), torch.zeros(4, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(3, 12), d_in=st.integers(3, 12), data=st.data())
def test_project_weight_with_bound_matches_dense_reference(d_out: int, d_in: int, data) -> None:
    """``W0 + P_U D P_Q + U diag(clamp(diag(U^T D V), +-tau S)) V^T`` in dense float64."""
    k = data.draw(st.integers(0, d_in - 1))
    r = data.draw(st.integers(1, min(d_out, d_in)))
    tau = data.draw(st.sampled_from([0.0, 0.01, 0.1]))
    gen = torch.Generator().manual_seed(d_out * 100 + d_in * 10 + k)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, s_all, vh = torch.linalg.svd(w0, full_matrices=False)
    u, s, v = u_all[:, :r], s_all[:r], vh[:r].T
    q = orthonormal(d_in, k, gen)
    w = w0 + torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    d = w - w0
    p_u, p_q = torch.eye(d_out, dtype=torch.float64) - u @ u.T, torch.eye(d_in, dtype=torch.float64) - q @ q.T
    delta = torch.diag(u.T @ d @ v)
    clamped = torch.maximum(torch.minimum(delta, tau * s), -tau * s)
    expected = w0 + p_u @ d @ p_q + u @ torch.diag(clamped) @ v.T
    got = project_weight_(w.clone(), q, w0 @ q, u, v, u.T @ w0, s=s, channel_bound=tau)  # float64 anchors
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_bound_needs_singular_values():
    w = torch.randn(4, 5)
    q, u, v = torch.zeros(5, 0), torch.eye(4, 2), torch.eye(5, 2)
    a_q, a_u = anchors(w, q, u)
    with pytest.raises(ValueError, match="needs the singular values"):
        project_weight_(w.clone(), q, a_q, u, v, a_u, channel_bound=0.1)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_channel_bound_fails_at_construction(bad: float):
    with pytest.raises(ValueError, match="channel_bound"):
        ForaConfig(channel_bound=bad)


def test_gradient_mode_warns_that_the_bound_is_not_enforced():
    with pytest.warns(UserWarning, match="FORA: channel_bound=0.05 is not enforced in mode='gradient'"):
        cb = FORA(calibration=[], mode="gradient", channel_bound=0.05)
    assert not cb.protection.bounds_channel


def test_summary_prints_the_bound():
    sub = LayerSubspace(
        d_out=4,
        d_in=3,
        k=1,
        basis=torch.eye(3, 1),
        complement=False,
        u=torch.eye(4, 2),
        s=torch.ones(2),
        v=torch.eye(3, 2),
    )
    assert "||(W - W0) x|| <= 0.05 ||W0 x||" in format_summary({"fc": sub}, channel_bound=0.05)
    assert "unbounded" in format_summary({"fc": sub})


# ------------------------------------------------------------------------------------------ training
def _worst_span_ratio(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], subspaces, seed: int = 11
) -> float:
    """``max_x ||(W - W0) x|| / ||W0 x||`` over 256 random held-out x = Q z per layer, maximised over layers."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for name, sub in subspaces.items():
        q = (
            complement_basis(sub.basis.double()) if sub.complement else sub.basis.double()
        )  # FORA-LoRA may hold span(Q)^perp
        x = torch.randn(256, q.shape[1], generator=gen, dtype=torch.float64) @ q.T
        w0 = base[name].double()
        ratio = (x @ (weights[name].double() - w0).T).norm(dim=1) / (x @ w0.T).norm(dim=1)
        worst = max(worst, float(ratio.max()))
    return worst


def _mlp_fit(callback_cls, bound: float | None, mlp) -> float:
    base = {n: m.weight.detach().clone() for n, m in (("fc1", mlp.fc1), ("fc2", mlp.fc2))}
    mlp.hparams.lr = 5e-2
    cb = callback_cls(
        calibration=calibration_loader(),
        target_modules=["fc1", "fc2"],
        weight_rank=4,
        channel_bound=bound,
        progress=False,
    )
    tiny_trainer(callbacks=[cb], max_steps=150).fit(mlp, task_loader())
    if callback_cls is FORA:
        weights = {"fc1": mlp.fc1.weight.detach(), "fc2": mlp.fc2.weight.detach()}
    else:
        layers = fora_lora_layers(mlp)
        weights = {n: base[n] + layers[n].delta_weight().detach().float() for n in base}
    assert all(s.k > 0 and s.r == 4 for s in cb.subspaces.values())
    return _worst_span_ratio(weights, base, cb.subspaces)


@pytest.mark.parametrize("callback_cls", [FORA, ForaLoRA], ids=["fora", "fora_lora"])
def test_mlp_bound_holds_on_span_inputs(callback_cls, mlp):
    unbounded = _mlp_fit(callback_cls, None, copy.deepcopy(mlp))
    bounded = _mlp_fit(callback_cls, TAU, mlp)
    assert unbounded > TAU, (
        f"without the bound the channel should move span outputs by more than tau, got {unbounded:.4f}"
    )
    assert bounded <= TAU + 1e-5


def _llama_fit(callback_cls, bound: float | None) -> float:
    model = TinyLM()
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    calibration = _batches(6, seed=1, low=0, high=VOCAB // 2, pad=True)
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]
    cb = callback_cls(
        calibration=calibration, target_modules=TARGETS, energy=0.99, weight_rank=4, channel_bound=bound, progress=False
    )
    tiny_trainer(callbacks=[cb], max_steps=150).fit(model, DataLoader(train, batch_size=None))
    if callback_cls is FORA:
        modules = dict(model.named_modules())
        weights = {n: modules[n].weight.detach() for n in base}
    else:
        layers = fora_lora_layers(model)
        weights = {n: base[n] + layers[n].delta_weight().detach().float() for n in base}
    return _worst_span_ratio(weights, base, cb.subspaces)


@pytest.mark.parametrize("callback_cls", [FORA, ForaLoRA], ids=["fora", "fora_lora"])
def test_tiny_llama_bound_holds_on_span_inputs(callback_cls):
    unbounded = _llama_fit(callback_cls, None)
    bounded = _llama_fit(callback_cls, TAU)
    assert unbounded > TAU, (
        f"without the bound the channel should move span outputs by more than tau, got {unbounded:.4f}"
    )
    assert bounded <= TAU + 1e-5


def test_bound_is_recorded_in_the_subspace_file_and_the_checkpoint(mlp, tmp_path):
    path = tmp_path / "keep.safetensors"
    cb = FORA(
        calibration=calibration_loader(),
        target_modules=["fc1", "fc2"],
        weight_rank=2,
        channel_bound=0.03,
        subspaces=str(path),
        progress=False,
    )
    tiny_trainer(callbacks=[cb], max_steps=2).fit(mlp, task_loader())
    assert read_metadata(path)["config"]["channel_bound"] == 0.03
    assert cb.state_dict()["config"]["channel_bound"] == 0.03
