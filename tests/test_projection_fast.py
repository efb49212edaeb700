"""The fused projections (in place, row-sharded, batched by shape) against the dense float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning.core.projection import project, project_weight_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import complement_basis, weight_triplets


def _zero_padded(frames):
    """``n x k_i`` frames stacked as ``L x n x max k_i`` (the batched form's zero columns leave ``P_Q`` unchanged)."""
    k = max(f.shape[1] for f in frames)
    return torch.stack([torch.cat([f, f.new_zeros(f.shape[0], k - f.shape[1])], 1) for f in frames])


def _layers(n_layers, d_out, d_in, r, seed):
    """Equal-shape layers with different k each: (w0, q, u, v) in float64."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        u_all, _, vh = torch.linalg.svd(w0, full_matrices=False)
        k = (i * 7 + seed) % (d_in + 1)
        out.append((w0, orthonormal(d_in, k, gen), u_all[:, :r], vh[:r].T))
    return gen, out


layer_sets = st.tuples(
    st.integers(1, 5), st.integers(1, 12), st.integers(1, 12), st.integers(0, 4), st.integers(0, 2**16)
)


@settings(max_examples=40, deadline=None)
@given(layer_sets, st.booleans())
def test_batched_project_matches_dense_per_layer(case, use_complement):
    n_layers, d_out, d_in, r, seed = case
    r = min(r, d_out, d_in)
    gen, layers = _layers(n_layers, d_out, d_in, r, seed)
    grads = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in layers]
    expected = [dense_pi(g, q, u, v) for g, (_, q, u, v) in zip(grads, layers)]
    bases = [complement_basis(q) if use_complement else q for _, q, _, _ in layers]
    u = torch.stack([u for *_, u, _ in layers])
    v = torch.stack([v for *_, v in layers])
    out = project(torch.stack(grads), _zero_padded(bases), u, v, complement=use_complement)
    for got, want in zip(out.unbind(0), expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(layer_sets, st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_batched_project_weight_matches_dense_per_layer(case, dtype):
    n_layers, d_out, d_in, r, seed = case
    r = min(r, d_out, d_in)
    gen, layers = _layers(n_layers, d_out, d_in, r, seed)
    ws = [w0 + torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for w0, *_ in layers]
    expected = [w0 + dense_pi(w - w0, q, u, v) for w, (w0, q, u, v) in zip(ws, layers)]
    weights = torch.stack([w.to(dtype) for w in ws])
    cast = torch.float64 if dtype == torch.float64 else torch.float32
    basis = _zero_padded([q.to(cast) for _, q, _, _ in layers])
    anchor_q = _zero_padded([(w0 @ q).to(cast) for w0, q, _, _ in layers])
    u = torch.stack([u.to(cast) for *_, u, _ in layers])
    v = torch.stack([v.to(cast) for *_, v in layers])
    anchor_u = torch.stack([(u.T @ w0).to(cast) for w0, _, u, _ in layers])
    assert project_weight_(weights, basis, anchor_q, u, v, anchor_u) is weights
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-2}[dtype]
    for got, want, w in zip(weights.unbind(0), expected, ws):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tol * (1 + float(w.abs().max())), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("use_complement", [False, True])
def test_project_leaves_its_input_untouched(dtype, use_complement):
    gen, [(w0, q, u, v)] = _layers(1, 9, 7, 3, seed=4)
    grad = torch.randn(9, 7, generator=gen).to(dtype)
    before = grad.clone()
    basis = complement_basis(q) if use_complement else q
    out = project(grad, basis.float(), u.float(), v.float(), complement=use_complement)
    assert out.data_ptr() != grad.data_ptr()
    torch.testing.assert_close(grad, before, atol=0, rtol=0)
    want = dense_pi(grad.double(), q, u, v)
    torch.testing.assert_close(out.double(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=2e-2)


def test_row_sharded_projection_equals_full_rows():
    """FSDP2 rows: each shard's rows of Pi(G) and of W0 + Pi(W - W0), with U^T X summed by ``all_reduce``."""
    gen, [(w0, q, u, v)] = _layers(1, 10, 6, 3, seed=11)
    w = w0 + torch.randn(10, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    full_pi = dense_pi(g, q, u, v)
    full_w = w0 + dense_pi(w - w0, q, u, v)
    anchor_u = u.T @ w0
    for rows in (slice(0, 4), slice(4, 10)):
        other = torch.ones(10, dtype=torch.bool)
        other[rows] = False
        local_g = project(g[rows], q, u[rows], v, all_reduce=lambda t, other=other: t + u[other].T @ g[other])
        torch.testing.assert_close(local_g, full_pi[rows], atol=1e-10, rtol=1e-10)
        local_w = w[rows].clone()
        project_weight_(
            local_w, q, w0[rows] @ q, u[rows], v, anchor_u, all_reduce=lambda t, other=other: t + u[other].T @ w[other]
        )
        torch.testing.assert_close(local_w, full_w[rows], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 33)])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_weight_triplets_gram_route_matches_full_svd(shape, r):
    gen = torch.Generator().manual_seed(shape[0] * 7 + r)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.linspace(
        2.0, 0.1, shape[1], dtype=torch.float64
    )
    u, s, v = weight_triplets(w, r)
    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s.double(), s_ref[:r], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u.double().T @ u.double(), torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    # same subspaces (sign-free): the projectors agree
    torch.testing.assert_close(u.double() @ u.double().T, u_ref[:, :r] @ u_ref[:, :r].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.double() @ v.double().T, vh_ref[:r].T @ vh_ref[:r], atol=1e-5, rtol=0)
    torch.testing.assert_close(u.double().T @ w @ v.double(), torch.diag(s.double()), atol=1e-5, rtol=1e-5)


def test_weight_triplets_rank_deficient_falls_back_to_svd():
    """r = 4 > rank 2: the kept tail is zero, U stays orthonormal."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 24, generator=gen, dtype=torch.float64)
    u, s, v = weight_triplets(w, 4)
    torch.testing.assert_close(u.double().T @ u.double(), torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(v.double().T @ v.double(), torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(s[2:].abs().max()) < 1e-5 * float(s[0])
