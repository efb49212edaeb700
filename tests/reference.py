"""Dense float64 references shared by the math tests: explicit projector matrices, never used by the library."""

import torch


def orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthonormal ``d x k`` frame (float64)."""
    q, _ = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen, dtype=torch.float64))
    return q[:, :k]


def dense_pi(g: torch.Tensor, q: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Pi(G) = P_U G P_Q + U diag(diag(U^T G V)) V^T`` with explicit ``I - QQ^T`` and ``I - UU^T``."""
    p_q = torch.eye(q.shape[0], dtype=torch.float64) - q @ q.T
    p_u = torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T
    return p_u @ g @ p_q + u @ torch.diag(torch.diag(u.T @ g @ v)) @ v.T
