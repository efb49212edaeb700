"""``offload_anchors``: anchors in host memory and complement bases in update mode, against the dense float64 reference.

With a complement basis C (k > d_in / 2) the re-projection uses Q = ``complement_basis(C)``: any orthonormal basis
of span(C)'s complement gives the same ``Q Q^T = I - C C^T``, so the same feasible set and projection.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_loader, span_basis, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning import FORA
from fora_lightning.core.projection import project_weight_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, build_subspace, complement_basis, spectrum
from fora_lightning.layout import TargetLayout
from fora_lightning.metrics import leakage
from fora_lightning.protection import Protection


def _subspace(w0: torch.Tensor, q: torch.Tensor, r: int, gen: torch.Generator, complement: bool) -> LayerSubspace:
    d_out, d_in = w0.shape
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    basis = complement_basis(q.double()) if complement else q.double()
    return LayerSubspace(d_out=d_out, d_in=d_in, k=q.shape[1], basis=basis.float().contiguous(), complement=complement,
                         u=u[:, :r].float().contiguous(), s=s[:r].float(), v=vh[:r].T.float().contiguous())  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(3, 24), d_in=st.integers(4, 24), frac=st.floats(0.55, 0.95), r=st.integers(0, 3))
def test_complement_reprojection_from_host_anchors_equals_dense_reference(d_out, d_in, frac, r):
    gen = torch.Generator().manual_seed(d_out * 100 + d_in)
    k, r = min(d_in - 1, max(1, round(frac * d_in))), min(r, d_out, d_in)
    q = orthonormal(d_in, k, gen)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    sub = _subspace(w0.float(), q, r, gen, complement=True)
    sub.attach_anchors(w0.float(), on_host=True)
    assert sub.anchor_basis.shape == (d_in, k) and sub.basis.shape == (d_in, d_in - k)
    qq = sub.anchor_basis.double()
    assert float((qq @ qq.T - q @ q.T).norm()) < 1e-5  # the same span as Q
    w = w0 + torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    got = project_weight_(w.float(), sub.reprojection_basis, sub.anchor_q, sub.u, sub.v, sub.anchor_u).double()
    want = w0 + dense_pi(w - w0, q, sub.u.double(), sub.v.double())
    assert float((got - want).norm() / w.norm()) < 1e-5
    with pytest.raises(ValueError, match="offload_anchors"):
        _subspace(w0.float(), q, r, gen, complement=True).attach_anchors(w0.float())


def test_device_bytes_reach_the_basis_floor():
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k, r = 40, 32, 24, 2
    q, w0 = orthonormal(d_in, k, gen), torch.randn(d_out, d_in, generator=gen)
    full = _subspace(w0, q, r, gen, complement=False)
    full.attach_anchors(w0)
    host = _subspace(w0, q, r, gen, complement=True)
    host.attach_anchors(w0, on_host=True)
    small = 4 * (d_out * r + r + d_in * r + r * d_in)  # U, S, V, B0
    assert full.nbytes(host=False) == 4 * (d_in * k + d_out * k) + small
    assert host.nbytes(host=False) == 4 * min(k, d_in - k) * d_in + small
    assert host.nbytes() == host.nbytes(host=False) + 4 * (d_out * k + d_in * k)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_200_adamw_steps_with_host_anchors_keep_span_leakage_below_1e5(mlp, precision):
    targets = {"fc1": mlp.fc1, "fc2": mlp.fc2}
    w0 = {n: m.weight.detach().clone() for n, m in targets.items()}
    calib = torch.cat(list(calibration_loader()))
    h = torch.tanh(mlp.fc1(calib)).detach()
    cov = {"fc1": calib.T @ calib / len(calib), "fc2": h.T @ h / len(h)}
    # k = 12 of fc1's 16 inputs and 18 of fc2's 24: complements of 4 and 6 columns
    subs = {n: build_subspace(n, w0[n], SubspaceConfig(rank=k, weight_rank=2), spectrum(cov[n]), allow_complement=True)
            for n, k in (("fc1", 12), ("fc2", 18))}  # fmt: skip
    assert all(s.complement for s in subs.values())
    layout = TargetLayout(targets, mlp)
    layout.attach_anchors(subs, on_host=True)
    opt = torch.optim.AdamW([m.weight for m in targets.values()], lr=3e-3, weight_decay=0.1)
    batches = list(task_loader())
    for i in range(200):
        opt.zero_grad()
        torch.nn.functional.mse_loss(mlp(batches[i % len(batches)][0]), batches[i % len(batches)][1]).backward()
        layout.project_grads(subs, precision)
        opt.step()
        layout.reproject(subs, precision)
    assert float((mlp.fc1.weight.detach() - w0["fc1"]).norm() / w0["fc1"].norm()) > 0.1  # it trained
    for n, sub in subs.items():
        d = (targets[n].weight.detach() - w0[n]).double()
        u, v = sub.u.double(), sub.v.double()
        x = (
            torch.randn(300, sub.k, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
            @ sub.anchor_basis.double().T
        )
        assert leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0[n], x) < 1e-5, n


def test_callback_offloads_anchors_and_uses_complements(mlp):
    w0 = copy.deepcopy(mlp.fc1.weight.detach())
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], weight_rank=2, rank=12, offload_anchors=True,
              channel_bound=None, progress=False)  # fmt: skip
    tiny_trainer(max_steps=30, callbacks=[cb]).fit(mlp, task_loader())
    sub = cb.subspaces["fc1"]
    assert sub.complement and sub.basis.shape == (16, 4) and sub.anchor_basis.shape == (16, 12)
    x = span_inputs(200, seed=9)  # the calibration span (5 dims) lies inside span(Q)
    assert float((sub.anchor_basis.double().T @ span_basis().double()).norm() ** 2) > 5 - 1e-4
    d = (mlp.fc1.weight.detach() - w0).double()
    u, v = sub.u.double(), sub.v.double()
    assert float(d.norm()) > 1e-2 and leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0, x) < 1e-5


@pytest.mark.parametrize("first_offloaded", [False, True])
def test_resume_with_offload_anchors_protects_the_original_w0(mlp, tmp_path, first_offloaded, monkeypatch):
    """A fit checkpointed at step 16 (anchors on the device: Q; or on the host: a complement basis) and resumed to 32
    with offload_anchors=True (calibration may not run again): anchors W0 Q of the ORIGINAL W0, held on the host, the
    same weights as the same resume with the anchors on the device, and leakage against the original W0 at round-off."""
    w0, start = mlp.fc1.weight.detach().clone(), copy.deepcopy(mlp.state_dict())
    kw = dict(
        target_modules=["fc1"], weight_rank=2, rank=12, precision="float32", progress=False, reprojection="anchors"
    )
    trainer = tiny_trainer(max_steps=16, callbacks=[FORA(calibration_loader(), offload_anchors=first_offloaded, **kw)])
    trainer.fit(mlp, task_loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    mid = mlp.fc1.weight.detach().clone()

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("bases re-estimated on resume")

    monkeypatch.setattr(Protection, "estimate", forbidden)  # calibration data is read to verify the bases, no more
    weights, subs = {}, {}
    for offload in (True, False):
        mlp.load_state_dict(start)  # the checkpoint restores the step-16 weights
        cb = FORA(calibration_loader(), offload_anchors=offload, **kw)
        tiny_trainer(max_steps=32, callbacks=[cb]).fit(mlp, task_loader(), ckpt_path=tmp_path / "mid.ckpt")
        weights[offload], subs[offload] = mlp.fc1.weight.detach().clone(), cb.subspaces["fc1"]
    sub = subs[True]
    assert sub.complement is first_offloaded and sub.anchors_on_host and sub.anchor_q.device.type == "cpu"
    q = sub.reprojection_basis.double()
    torch.testing.assert_close(sub.anchor_q.double(), w0.double() @ q, rtol=0, atol=1e-5)  # W0 Q, not the checkpoint's
    assert float(((mid - w0).double() @ q).norm()) > 1e-2  # (the checkpoint's W Q would differ: its channel moved)
    assert float((mid - w0).norm()) > 1e-2 and float((weights[True] - mid).norm()) > 1e-3  # both halves trained
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)
    d = (weights[True] - w0).double()
    u, v = sub.u.double(), sub.v.double()
    assert leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0, span_inputs(200, seed=9)) < 1e-5
