"""How much of a covariance's trace a subspace holds, and the energy rule that picks k from it.

    cumulative energy   e_k = sum_{i<k} lambda_i / tr(C)          (lambda descending, clamped at 0)
    energy rule         k   = min { k : held + e_k >= energy }     (GPM, Saha et al. 2021; held = 0 for a new basis)
    captured energy     tr(Q^T C Q) / tr(C)                         (= e_k when Q holds C's top-k eigenvectors)

Plain torch: no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SLACK = 1e-12  # the rule accepts e_k within this of ``energy`` (float64 rounding of the running sum)


def cumulative_energy(eigenvalues: Tensor, total: float | None = None) -> Tensor:
    """``e_k = sum_{i<k} lambda_i / total`` for ``k = 1..d`` (float64, eigenvalues clamped at 0).

    ``total`` defaults to ``sum_i lambda_i`` (then ``e_d = 1``); all zeros when it is not positive.
    """
    lam = eigenvalues.double().clamp_min(0)
    cum = torch.cumsum(lam, 0)
    total = float(lam.sum()) if total is None else total
    return cum / total if total > 0 else torch.zeros_like(cum)


def energy_rank(eigenvalues: Tensor, energy: float, total: float | None = None, held: float = 0.0) -> int:
    """The energy rule: the smallest ``k <= d`` with ``held + e_k >= energy`` (:func:`cumulative_energy`).

    ``eigenvalues`` descending; ``held`` is a fraction of ``total`` already inside the basis (GPM's
    ``tr(Q^T C Q) / tr(C)``). 0 when the eigenvalues (or ``total``) hold no energy.
    """
    cum = cumulative_energy(eigenvalues, total)
    if cum.numel() == 0 or float(cum[-1]) <= 0:
        return 0
    target = torch.tensor(energy - held - _SLACK, dtype=cum.dtype, device=cum.device)
    return min(int(torch.searchsorted(cum, target).item()) + 1, cum.numel())


def captured_energy(basis: Tensor, cov: Tensor, complement: bool = False) -> float:
    """``tr(Q^T C Q) / tr(C)``: the fraction of ``C``'s energy inside span(Q) (``basis`` may be the complement).

    Float64; NaN when ``tr(C) <= 0``.
    """
    c = cov.double()
    b = basis.to(c)
    total = float(torch.trace(c).clamp_min(0))
    if total <= 0:
        return float("nan")
    inside = float(((c @ b) * b).sum())
    return (total - inside) / total if complement else inside / total
