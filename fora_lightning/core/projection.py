"""The FORA projections, in plain torch (no Lightning import).

The feasible set for the update ``D = W - W0`` of one linear layer is

    S = { P_U M P_Q + U_r diag(delta) V_r^T },   P_Q = I - Q Q^T,   P_U = I - U_r U_r^T,

and its orthogonal (Frobenius) projection is

    Pi(G) = P_U G P_Q + U_r diag(diag(U_r^T G V_r)) V_r^T.

Nothing here forms a d x d projector: ``G P_Q = G - (G Q) Q^T`` (or ``(G C) C^T`` for a stored
complement basis ``C``). All arithmetic runs in float32 (or float64 if the inputs are float64)
and the result is cast back to the input dtype.

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
    return coords @ basis.T if complement else x - coords @ basis.T


def _left_coords(u: Tensor, x: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """``U^T X`` (r x d_in), summed over row shards when ``all_reduce`` is given."""
    utx = u.T @ x
    return all_reduce(utx) if all_reduce is not None else utx


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
    out = right_project(g, q, complement)
    if u is not None and u.shape[1] > 0:
        u, v = u.to(dt), v.to(dt)
        utg = _left_coords(u, g, all_reduce)  # U^T G
        delta = (utg * v.T).sum(dim=1)  # diag(U^T G V)
        # P_U (G P_Q) + U diag(delta) V^T  =  G P_Q - U [ (U^T G) P_Q - diag(delta) V^T ]
        out = out - u @ (right_project(utg, q, complement) - delta[:, None] * v.T)
    return out.to(grad.dtype)


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
) -> Tensor:
    """In place: ``W <- W0 + Pi(W - W0)`` from anchors, with no copy of ``W0``.

    ``basis`` is ``Q`` (d_in x k, never the complement: the anchors live on span(Q)),
    ``anchor_q = W0 Q`` (rows as ``weight``), ``anchor_u = U^T W0`` (r x d_in, all rows summed).
    With ``D = W - W0``: ``D Q = W Q - A0`` and ``U^T D = U^T W - B0``, then ``W <- W - (D - Pi(D))``,

        D - Pi(D) = (D Q) Q^T + U [ U^T D - (U^T D Q) Q^T - diag(diag(U^T D V)) V^T ].

    Returns ``weight``.
    """
    dt = _compute_dtype(weight)
    w = weight.to(dt)
    q = basis.to(dt)
    dq = w @ q - anchor_q.to(dt)  # D Q  (rows local)
    removed = dq @ q.T
    if u is not None and u.shape[1] > 0:
        u, v = u.to(dt), v.to(dt)
        utd = _left_coords(u, w, all_reduce) - anchor_u.to(dt)  # U^T D
        delta = (utd * v.T).sum(dim=1)  # diag(U^T D V)
        removed = removed + u @ (utd - (utd @ q) @ q.T - delta[:, None] * v.T)
    weight.copy_((w - removed).to(weight.dtype))
    return weight


def relative_leakage(delta_w: Tensor, w0: Tensor, x: Tensor) -> float:
    """``||(W - W0) X|| / ||W0 X||`` (Frobenius), ``x`` as rows (n x d_in); in float64."""
    d = delta_w.detach().double()
    w = w0.detach().double()
    xs = x.detach().double().reshape(-1, x.shape[-1])
    return float((xs @ d.T).norm() / (xs @ w.T).norm().clamp_min(1e-300))
