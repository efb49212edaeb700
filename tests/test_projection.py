"""Pi and the post-step re-projection against dense float64 references (explicit I - QQ^T)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning.core.projection import project, project_weight_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import complement_basis
from fora_lightning.metrics import leakage

shapes = st.tuples(
    st.integers(1, 24),  # d_out
    st.integers(1, 24),  # d_in
    st.integers(0, 24),  # k (clamped)
    st.integers(0, 8),  # r (clamped)
    st.integers(0, 2**16),  # seed
)


def _case(d_out, d_in, k, r, seed):
    gen = torch.Generator().manual_seed(seed)
    k, r = min(k, d_in), min(r, d_out, d_in)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, _, vh = torch.linalg.svd(w0, full_matrices=False)
    q = orthonormal(d_in, k, gen)
    return gen, w0, q, u_all[:, :r], vh[:r].T


@settings(max_examples=60, deadline=None)
@given(shapes, st.booleans())
def test_pi_matches_dense_idempotent_and_orthogonal_parts(case, use_complement):
    gen, w0, q, u, v = _case(*case)
    g = torch.randn(*w0.shape, generator=gen, dtype=torch.float64)
    basis = complement_basis(q) if use_complement else q
    pi = project(g, basis, u, v, complement=use_complement)
    ref = dense_pi(g, q, u, v)
    torch.testing.assert_close(pi, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(project(pi, basis, u, v, complement=use_complement), pi, atol=1e-10, rtol=1e-10)
    # the two parts P_U G P_Q and U diag(.) V^T are Frobenius-orthogonal
    no_channel = project(g, basis, u[:, :0], v[:, :0], complement=use_complement)
    p_u = torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T
    part1 = p_u @ no_channel
    part2 = pi - part1
    assert abs(float((part1 * part2).sum())) <= 1e-9 * (1 + float(g.norm()) ** 2)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_reprojection_equals_dense_w0_plus_pi(case, dtype):
    gen, w0, q, u, v = _case(*case)
    w = w0 + torch.randn(*w0.shape, generator=gen, dtype=torch.float64)
    expected = w0 + dense_pi(w - w0, q, u, v)
    weight = w.to(dtype)
    anchor_q = (w0 @ q).float()
    anchor_u = (u.T @ w0).float()
    out = project_weight_(weight, q.float(), anchor_q, u.float(), v.float(), anchor_u)
    assert out is weight and weight.dtype == dtype
    tol = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(weight.double(), expected, atol=tol * (1 + float(w.abs().max())), rtol=tol)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_projection_computes_in_float32_and_returns_input_dtype(case, dtype):
    gen, w0, q, u, v = _case(*case)
    g = torch.randn(*w0.shape, generator=gen).to(dtype)
    out = project(g, q.float(), u.float(), v.float())
    assert out.dtype == dtype
    ref = dense_pi(g.double(), q, u, v).to(dtype)
    torch.testing.assert_close(out, ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=2e-2)


def test_update_in_feasible_set_does_not_leak_on_span_q():
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k, r = 12, 10, 4, 2
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, _, vh = torch.linalg.svd(w0, full_matrices=False)
    u, v = u_all[:, :r], vh[:r].T
    q = orthonormal(d_in, k, gen)
    delta = project(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64), q, u, v)
    x = torch.randn(50, k, generator=gen, dtype=torch.float64) @ q.T  # inputs in span(Q)
    channel = u @ torch.diag(torch.diag(u.T @ delta @ v)) @ v.T
    assert leakage(delta - channel, w0, x) < 1e-12
    assert leakage(delta, w0, torch.randn(50, d_in, generator=gen, dtype=torch.float64)) > 1e-2
