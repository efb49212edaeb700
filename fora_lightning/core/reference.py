"""The dense float64 reference projector, for verification only: tests and benchmarks check FORA against it.

    Pi(G) = (I - U U^T) G (I - Q Q^T) + U diag(diag(U^T G V)) V^T

with both projectors formed as explicit matrices, so that it shares no code (and no factoring) with
:mod:`fora_lightning.core.projection`. It costs ``O(d_out^2 d_in + d_out d_in^2)`` flops and
``d_in^2 + d_out^2`` float64 memory: never import it from the library (``tests/test_reference.py`` checks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_pi(g: Tensor, q: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``Pi(G)`` in float64 on ``g``'s device, with explicit ``I - QQ^T`` (d_in x d_in) and ``I - UU^T`` (d_out x d_out).

    ``q`` is Q itself (d_in x k, not a complement basis); ``u``/``v`` are ``d_out x r``/``d_in x r`` (r may be 0).
    """
    g, q, u, v = (t.double() for t in (g, q, u, v))
    p_q = torch.eye(q.shape[0], dtype=torch.float64, device=g.device) - q @ q.T
    p_u = torch.eye(u.shape[0], dtype=torch.float64, device=g.device) - u @ u.T
    return p_u @ g @ p_q + u @ torch.diag(torch.diag(u.T @ g @ v)) @ v.T
