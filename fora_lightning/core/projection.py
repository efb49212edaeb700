"""The FORA projections, in plain torch (no Lightning import).

The feasible set for the update ``D = W - W0`` of one linear layer is

    S = { P_U M P_Q + U_r diag(delta) V_r^T },   P_Q = I - Q Q^T,   P_U = I - U_r U_r^T,

and its orthogonal (Frobenius) projection is

    Pi(G) = P_U G P_Q + U_r diag(diag(U_r^T G V_r)) V_r^T.

Nothing here forms a d x d projector: ``G P_Q = G - (G Q) Q^T`` (or ``(G C) C^T`` for a stored
complement basis ``C``). All arithmetic runs in float32 (or float64 if the inputs are float64)
and the result is cast back to the input dtype.

Both corrections are accumulated into a single output by two GEMM-accumulate calls,
``out = G - (G Q) Q^T`` then ``out -= U M`` (in place for the weight): no d_out x d_in
temporaries and no copy of ``Q^T``. Both projections also accept a leading batch dimension (``L`` layers
of equal shape, bases zero-padded to a common k: zero columns leave ``P_Q`` unchanged); the library
projects layer by layer, the benchmarks time the batched form (``benchmarks/_bench.py``).

The bounded channel (``channel_bound = tau``): :func:`bound_channel` clamps ``delta_i`` to
``[-tau S_i, tau S_i]``; then for every x in span(Q), ``||(W - W0) x|| = ||diag(delta) V_r^T x||
<= tau ||S_r V_r^T x|| <= tau ||W0 x||`` (the last step since ``U_r^T (W0 - U_r S_r V_r^T) = 0``).

Sharded use (FSDP2 rows): pass the *local rows* of ``G``/``W``/``U``/``A0`` and an
``all_reduce`` callable that sums an ``r x d_in`` tensor over the shard group; the right
projection is row-local, and ``U^T G`` is the only cross-row quantity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def right_project(x: Tensor, basis: Tensor, complement: bool = False) -> Tensor:
    """``x P_Q`` along the last dimension: ``x - (x Q) Q^T``, or ``(x C) C^T`` for a complement ``C``."""
    coords = x @ basis
    return coords @ basis.mT if complement else _sub_mm(x, coords, basis.mT)


def _left_coords(u: Tensor, x: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """``U^T X`` (r x d_in), summed over row shards when ``all_reduce`` is given."""
    utx = u.mT @ x
    return all_reduce(utx) if all_reduce is not None else utx


def _sub_mm(c: Tensor, a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    """``c - a b`` in one (batched) GEMM call, into ``c`` itself when ``inplace`` (factors cast to
    ``c``'s dtype: under autocast they may arrive in bf16)."""
    if inplace:
        a, b = a.to(c.dtype), b.to(c.dtype)
    if c.dim() == 2:
        return c.addmm_(a, b, alpha=-1) if inplace else torch.addmm(c, a, b, alpha=-1)
    return c.baddbmm_(a, b, alpha=-1) if inplace else torch.baddbmm(c, a, b, alpha=-1)


def _channel_free(utx: Tensor, q: Tensor, v: Tensor, complement: bool) -> Tensor:
    """``M = (U^T X) P_Q - diag(diag(U^T X V)) V^T`` (r x d_in)."""
    delta = (utx * v.mT).sum(dim=-1)  # diag(U^T X V)
    return right_project(utx, q, complement) - delta.unsqueeze(-1) * v.mT


def project(
    grad: Tensor,
    basis: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    complement: bool = False,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """``Pi(G) = P_U G P_Q + U diag(diag(U^T G V)) V^T`` for ``G`` (d_out x d_in, or its local rows).

    ``basis`` is ``Q`` (d_in x k) or, with ``complement=True``, an orthonormal basis of its
    complement. ``u`` (d_out x r, same rows as ``grad``) and ``v`` (d_in x r) are the weight's top
    singular vectors; ``None`` or ``r = 0`` turns off the left projector and the spectral channel.
    Cost ``4 d_out d_in (k + r)`` flops. Returns a new tensor of ``grad``'s dtype.
    """
    dt = _compute_dtype(grad)
    g = grad.to(dt)
    q = basis.to(dt)
    m = None
    if u is not None and u.shape[-1] > 0:
        u, v = u.to(dt), v.to(dt)
        m = _channel_free(_left_coords(u, g, all_reduce), q, v, complement)
    # G P_Q = G - (G Q) Q^T  (or (G C) C^T), into a fresh tensor, or into g when g is our float32 copy
    out = right_project(g, q, complement) if g is grad or complement else _sub_mm(g, g @ q, q.mT, inplace=True)
    if m is not None:  # P_U (G P_Q) + U diag(diag(U^T G V)) V^T  =  G P_Q - U M
        _sub_mm(out, u, m, inplace=True)
    return out.to(grad.dtype)


@torch.no_grad()
def leak_part_(
    step: Tensor,
    basis: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    complement: bool = False,
    all_reduce: AllReduce | None = None,
    s: Tensor | None = None,
    delta: Tensor | None = None,
    channel_bound: float | None = None,
) -> Tensor:
    """In place: ``step <- step - Pi(step)``, the part of an optimizer step that leaves S (float32/float64, 2-D).

    ``step - Pi(step) = step (I - P_Q) + U M`` with ``M = (U^T step) P_Q - diag(diag(U^T step V)) V^T``;
    ``step (I - P_Q)`` is ``(step Q) Q^T``, or ``step - (step C) C^T`` for a complement basis ``C``.
    ``delta`` (r, updated in place) is the channel's running coordinate ``diag(U^T (W - W0) V)``: it grows by the
    step's ``diag(U^T step V)``; with ``channel_bound = tau`` (and ``s = S_r``) the excess over ``|delta_i| <= tau S_i``
    is added to the leak (``+ U diag(excess) V^T``), so subtracting the result keeps the bound. Returns ``step``.
    """
    if step.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"leak_part_ needs a float32/float64 step, got {step.dtype}")
    q = basis.to(step.dtype)
    m = coords = None
    if u is not None and u.shape[-1] > 0:
        u, v = u.to(step.dtype), v.to(step.dtype)
        utx = _left_coords(u, step, all_reduce)
        coords = (utx * v.mT).sum(dim=-1)
        m = _channel_free(utx, q, v, complement)
    if complement:
        _sub_mm(step, step @ q, q.mT, inplace=True)  # step - (step C) C^T
    elif step.is_contiguous():
        torch.mm(step @ q, q.mT, out=step)  # (step Q) Q^T
    else:  # a transposed view (GPT-2 Conv1D)
        step.copy_(step @ q @ q.mT)
    if m is not None:
        if delta is not None:
            moved = delta + coords.to(delta.dtype)
            if channel_bound is not None:
                if s is None:
                    raise ValueError("channel_bound needs the singular values s = S_r")
                excess = moved - bound_channel(moved, s, channel_bound)
                m.add_(excess.to(m.dtype).unsqueeze(-1) * v.mT)  # U diag(excess) V^T joins the leak
                moved -= excess
            delta.copy_(moved)
        step.addmm_(u, m)  # + U M
    return step


@torch.no_grad()
def project_step_(
    weight: Tensor,
    before: Tensor,
    basis: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """In place: ``W <- W_before + Pi(W - W_before)``, the optimizer's step projected onto S. No anchors, no ``W0``.

    If ``W_before - W0`` lies in S, so does the result: ``Pi`` is linear and ``W - W0 = (W_before - W0) + Pi(step)``.
    The products multiply only the step (FORA.md: rounding scales with what is multiplied), in float32; subtracting
    the leak rounds once per step (about ``2^-24 |W|`` per element, not re-anchored: it grows like ``sqrt(steps)``,
    which is why weights held in bf16/fp16 use the anchored :func:`project_weight_` instead).
    ``before`` (the weight before the step, same rows and dtype) is overwritten with the leak: the only buffer.
    ``kwargs``: :func:`leak_part_`'s (``complement``, ``all_reduce``, ``s``, ``delta``, ``channel_bound``).
    Returns ``weight``.
    """
    if weight.dtype not in (torch.float32, torch.float64) or before.dtype != weight.dtype:
        raise TypeError(
            f"project_step_ needs float32/float64 weights and a snapshot of the same dtype, got {weight.dtype}, {before.dtype}"
        )
    step = torch.sub(weight, before, out=before)
    weight.sub_(leak_part_(step, basis, u, v, **kwargs))
    return weight


def bound_channel(delta: Tensor, s: Tensor, tau: float) -> Tensor:
    """``clamp(delta, -tau S, tau S)``: the spectral channel's coordinates inside the certified box (a new tensor)."""
    limit = tau * s.to(delta.dtype).abs()
    return torch.maximum(torch.minimum(delta, limit), -limit)


def left_correction(
    w: Tensor,
    q: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    anchor_u: Tensor | None,
    *,
    all_reduce: AllReduce | None = None,
    s: Tensor | None = None,
    channel_bound: float | None = None,
) -> Tensor | None:
    """``M = U^T D - (U^T D Q) Q^T - diag(diag(U^T D V)) V^T`` with ``U^T D = U^T W - B0`` (``None`` when r = 0), so that
    ``W <- W - (D Q) Q^T - U M`` re-projects; with ``channel_bound = tau`` also ``+ diag(delta - clamp(delta)) V^T``
    (``delta = diag(U^T D V)``), which leaves ``|delta_i| <= tau S_i``. In ``w``'s dtype."""
    if u is None or u.shape[-1] == 0:
        return None
    dt = w.dtype
    u, v = u.to(dt), v.to(dt)
    utd = _left_coords(u, w, all_reduce) - anchor_u.to(dt)  # U^T D
    m = _channel_free(utd, q.to(dt), v, False)
    if channel_bound is not None:
        if s is None:
            raise ValueError("channel_bound needs the singular values s = S_r")
        delta = (utd * v.mT).sum(dim=-1)  # diag(U^T D V)
        m.add_((delta - bound_channel(delta, s, channel_bound)).unsqueeze(-1) * v.mT)
    return m


@torch.no_grad()
def anchors(weight: Tensor, basis: Tensor, u: Tensor, *, all_reduce: AllReduce | None = None) -> tuple[Tensor, Tensor]:
    """The re-projection's anchors from W0 (float32): ``A0 = W0 Q`` (rows as ``weight``) and ``B0 = U^T W0``
    (``r x d_in``; for a row shard pass its rows of ``U`` and an ``all_reduce`` that sums over the shard group)."""
    w = weight.detach().float()
    return w @ basis, _left_coords(u, w, all_reduce)


@torch.no_grad()
def project_weight_(
    weight: Tensor,
    basis: Tensor,
    anchor_q: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    anchor_u: Tensor | None = None,
    *,
    all_reduce: AllReduce | None = None,
    s: Tensor | None = None,
    channel_bound: float | None = None,
) -> Tensor:
    """In place: ``W <- W0 + Pi(W - W0)`` from anchors, with no copy of ``W0``.

    ``basis`` is ``Q`` (d_in x k, never the complement: the anchors live on span(Q)),
    ``anchor_q = W0 Q`` (rows as ``weight``), ``anchor_u = U^T W0`` (r x d_in, all rows summed).
    With ``D = W - W0``: ``D Q = W Q - A0`` and ``U^T D = U^T W - B0``, then ``W <- W - (D - Pi(D))``,

        D - Pi(D) = (D Q) Q^T + U [ U^T D - (U^T D Q) Q^T - diag(diag(U^T D V)) V^T ].

    With ``channel_bound = tau`` (and ``s = S_r``) the channel is clamped in the same pass, no extra
    collective: with ``delta = diag(U^T D V)``, ``M += diag(delta - bound_channel(delta, S, tau)) V^T``, so
    the result holds ``|delta_i| <= tau S_i``. Returns ``weight``.
    """
    dt = _compute_dtype(weight)
    w = weight.to(dt)  # ``weight`` itself when it already is float32/float64
    q = basis.to(dt)
    dq = (w @ q).sub_(anchor_q.to(dt))  # D Q  (rows local)
    m = left_correction(w, q, u, v, anchor_u, all_reduce=all_reduce, s=s, channel_bound=channel_bound)
    _sub_mm(w, dq, q.mT, inplace=True)  # W <- W - (D Q) Q^T - U M
    if m is not None:
        _sub_mm(w, u.to(dt), m, inplace=True)
    if w is not weight:
        weight.copy_(w)
    return weight
