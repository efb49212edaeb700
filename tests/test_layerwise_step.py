"""``reprojection='step'``: each layer's optimizer step projected, ``W <- W_before + Pi(W - W_before)``, no anchors.

The math (:func:`project_step_`) against a dense float64 reference; :class:`LayerwiseStep` against the optimizer's own
whole step; the Callback with every default against the anchored re-projection (same weights, same guarantee, less
memory); calibration in groups of layers against one pass (the same bases).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_loader, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from fora_lightning import FORA
from fora_lightning.core.covariance import calibration_groups
from fora_lightning.core.projection import bound_channel, project_step_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import complement_basis, nbytes_summary
from fora_lightning.layerwise_step import LayerwiseStep, check_optimizer


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(2, 12),
    d_in=st.integers(2, 12),
    k_frac=st.floats(0.05, 0.95),
    r=st.integers(0, 3),
    complement=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bound=st.sampled_from([None, 0.0, 0.05]),
    seed=st.integers(0, 10_000),
)
def test_project_step_equals_the_dense_reference(d_out, d_in, k_frac, r, complement, dtype, bound, seed):
    """Five AdamW-like steps: W - W0 stays ``sum Pi(step)`` (dense float64), the channel coordinate is tracked and
    (``bound``) clamped to ``|delta_i| <= tau S_i``; a complement basis gives the same projector."""
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(d_in - 1, round(k_frac * d_in))) if d_in > 1 else 1
    r = min(r, d_out, d_in)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, s_all, vh = torch.linalg.svd(w0, full_matrices=False)
    u, s, v = u_all[:, :r], s_all[:r], vh[:r].T
    q, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=torch.float64))
    basis = complement_basis(q) if complement else q
    w = w0.to(dtype).clone()
    delta = torch.zeros(r, dtype=dtype)
    want = w0.clone()
    for _ in range(5):
        before = w.clone()
        step = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        w += step.to(dtype)
        project_step_(
            w, before, basis.to(dtype), u.to(dtype), v.to(dtype), complement=complement,
            s=s.to(dtype), delta=delta, channel_bound=bound,
        )  # fmt: skip
        want = want + dense_pi(step, q, u, v)
        if bound is not None and r:  # the clamp along u_i v_i^T, as the dense reference does it
            d = torch.diagonal(u.T @ (want - w0) @ v)
            want = want - u @ torch.diag(d - bound_channel(d, s, bound)) @ v.T
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(w.double(), want, rtol=0, atol=tol * float(want.abs().max()))
    if r:
        torch.testing.assert_close(delta.double(), torch.diagonal(u.T @ (want - w0) @ v), rtol=0, atol=tol * 10)
        if bound is not None:
            assert bool((delta.double().abs() <= bound * s + 1e-5).all())
    # what the capability reads (span(Q) inputs) moves only through the channel
    x = torch.randn(7, k, generator=gen, dtype=torch.float64) @ q.T
    d = w.double() - w0
    off = d - u @ torch.diag(torch.diagonal(u.T @ d @ v)) @ v.T
    assert float((x @ off.T).norm()) <= tol * 10 * float((x @ w0.T).norm()) + 1e-12


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)


class _Unit:
    def __init__(self, param: torch.Tensor, log: list) -> None:
        self.params, self.log = [param], log

    def before(self) -> torch.Tensor:
        self.log.append("before")
        return self.params[0].detach().clone()

    def after(self, saved: torch.Tensor) -> None:
        self.log.append("after")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
        lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.Adagrad(p, lr=1e-1),
    ],
)
def test_layerwise_step_is_the_optimizers_own_step(make):
    """Stepped one unit at a time (grads of the others untouched, groups restored), three steps equal the whole
    step bit for bit, with an LR scheduler created before the wrapper; removing it restores ``step``."""
    whole, parts = _Net(), _Net()
    opt_w = make([{"params": [whole.a.weight, whole.b.weight]}, {"params": [whole.c.weight, whole.a.bias]}])
    opt_p = make([{"params": [parts.a.weight, parts.b.weight]}, {"params": [parts.c.weight, parts.a.bias]}])
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt_w, opt_p)]
    log: list[str] = []
    wrapper = LayerwiseStep(opt_p, [_Unit(parts.a.weight, log), _Unit(parts.c.weight, log)]).install()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for net, opt in ((whole, opt_w), (parts, opt_p)):
            opt.zero_grad()
            net.c(torch.tanh(net.b(torch.tanh(net.a(x))))).square().sum().backward()
            opt.step()
        for sched in scheds:
            sched.step()
    for n, p in whole.named_parameters():
        assert torch.equal(p, dict(parts.named_parameters())[n]), n
    assert log == ["before", "after"] * 6
    assert [len(g["params"]) for g in opt_p.param_groups] == [2, 2]
    wrapper.remove()
    assert not hasattr(opt_p.step, "__self__") or opt_p.step.__func__ is not wrapper.__call__


def test_coupled_optimizers_are_refused_and_unknown_ones_warned():
    net = _Net()
    with pytest.raises(ValueError, match="LBFGS.*reprojection='anchors'"):
        check_optimizer(torch.optim.LBFGS(net.parameters()))

    class Shampoo(torch.optim.SGD):
        pass

    with pytest.warns(UserWarning, match="FORA: optimizer Shampoo is stepped one layer at a time"):
        check_optimizer(Shampoo(net.parameters(), lr=0.1))


def _fit(model, fora, steps=30):
    tiny_trainer(max_steps=steps, callbacks=[fora]).fit(model, task_loader())


def _span_leak(model, base, name="fc1"):
    x = span_inputs(64, seed=9)
    d = (getattr(model, name).weight - getattr(base, name).weight).detach().double()
    return float((x.double() @ d.T).norm() / (x.double() @ getattr(base, name).weight.double().T).norm())


def test_default_keeps_no_anchors_and_trains_as_the_anchored_reprojection(mlp):
    """Every default on float32 weights: no anchors (a complement basis where k > d_in/2), less memory, and the
    same trained weights as reprojection='anchors' (both give W_before + Pi(step); float32 arithmetic in both, as
    the anchored path's bf16 products would start another trajectory) with span leakage at round-off."""
    base = copy.deepcopy(mlp)
    runs = {}
    for how in ("auto", "anchors"):
        model = copy.deepcopy(base)
        fora = FORA(calibration=calibration_loader(), target_modules=["fc1", "fc2"], weight_rank=0, progress=False,
                    rank={"fc1": 5, "fc2": 20}, reprojection=how, precision="float32")  # fmt: skip
        _fit(model, fora)
        runs[how] = (model, fora)
    model, fora = runs["auto"]
    assert fora.protection.anchors is False
    assert all(s.anchor_q is None for s in fora.subspaces.values())
    assert fora.subspaces["fc2"].complement and fora.subspaces["fc2"].basis.shape == (24, 4)
    assert nbytes_summary(fora.subspaces) < nbytes_summary(runs["anchors"][1].subspaces) / 2
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(getattr(model, n).weight, getattr(runs["anchors"][0], n).weight, rtol=0, atol=1e-5)
    assert (model.fc1.weight - base.fc1.weight).abs().max() > 1e-2  # it trained
    assert _span_leak(model, base) < 1e-6


def test_bf16_weights_keep_anchors(mlp):
    """bf16 weights round every step; without anchors that rounding would accumulate: 'auto' picks anchors."""
    fora = FORA(calibration=calibration_loader(), target_modules=["fc1"], progress=False)
    tiny_trainer(max_steps=2, callbacks=[fora], precision="bf16-true").fit(mlp, task_loader())
    assert fora.protection.anchors is True and fora.subspaces["fc1"].anchor_q is not None


def test_offload_anchors_needs_anchors():
    with pytest.raises(ValueError, match="reprojection='step' keeps no anchors"):
        FORA(offload_anchors=True, reprojection="step")


def test_calibration_groups_keep_parents_together_and_fit_the_budget():
    d = {"l0.attn.q": 8, "l0.attn.k": 8, "l0.attn.v": 8, "l0.mlp.up": 8, "l0.mlp.down": 16, "l1.attn.q": 8}
    assert calibration_groups(d, None) == [list(d)]
    groups = calibration_groups(d, budget=3 * 64 * 4)
    assert groups == [["l0.attn.q", "l0.attn.k", "l0.attn.v"], ["l0.mlp.up", "l0.mlp.down"], ["l1.attn.q"]]
    assert calibration_groups(d, budget=10**9) == [list(d)]


def test_grouped_calibration_gives_the_same_bases():
    """A budget below one decoder block's sums: one pass per (attention | MLP) group, the same bases as one pass."""
    from test_early_stop import TARGETS, TinyLM, _batches

    out = {}
    for gib in (None, 2e-6):  # 2e-6 GiB = 2 KiB: fewer than every target's sums
        fora = FORA(calibration=_batches(3), target_modules=TARGETS, progress=False, calibration_memory_gib=gib)
        tiny_trainer(max_steps=1, callbacks=[fora]).fit(TinyLM(), DataLoader(_batches(4, 2), batch_size=None))
        out[gib] = fora.subspaces
    assert out[None].keys() == out[2e-6].keys()
    for n in out[None]:
        for field in ("basis", "u", "s", "v", "spectrum"):
            assert torch.equal(getattr(out[None][n], field), getattr(out[2e-6][n], field)), (n, field)
