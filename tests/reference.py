"""Random orthonormal frames for the math tests (the dense reference ``Pi`` is :mod:`fora_lightning.core.reference`)."""

import torch


def orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthonormal ``d x k`` frame (float64)."""
    q, _ = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen, dtype=torch.float64))
    return q[:, :k]
