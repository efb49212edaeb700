"""Per-layer k under one global budget: water-filling on normalised eigenvalues across layers.

The energy rule picks each layer's k alone (``e_k >= energy``). ``allocation`` instead keeps the total
``B = sum_l k_l^energy`` and spends it where a normalised eigenvalue is largest, over all layers at once:

    score_{l,i} = lambda_{l,i} / tr(C_l)                                   ("trace")
    score_{l,i} = lambda_{l,i} ||W0_l||_2^2 / tr(W0_l C_l W0_l^T)           ("output")

(``lambda`` descending; ``"output"`` weights the input energy of direction i by the layer's largest gain
relative to its mean gain on the data: an update of given norm moves that layer's outputs relatively more).
Every layer keeps its top direction; the other ``B - L`` directions go to the largest scores, so that one
threshold ``t`` holds: ``k_l = #{i : score_{l,i} >= t}`` (ties broken by layer order). Scores are
invariant to scaling ``C_l`` or ``W0_l``. Each ``k_l`` is capped by ``max_rank`` and ``d_in``.

Plain torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.energy import energy_rank

Allocation = Literal["energy", "trace", "output"]
ALLOCATIONS = ("energy", "trace", "output")


def layer_scores(
    eigenvalues: Tensor, allocation: Allocation, weight: Tensor | None = None, cov: Tensor | None = None
) -> Tensor:
    """One layer's normalised eigenvalues (float64, descending); ``"output"`` needs ``weight`` (W0) and ``cov`` (C)."""
    lam = eigenvalues.double().clamp_min(0)
    total = float(lam.sum())
    if total <= 0:
        return torch.zeros_like(lam)
    if allocation == "trace":
        return lam / total
    if allocation != "output":
        raise ValueError(f"allocation must be 'trace' or 'output' for scores, got {allocation!r}")
    if weight is None or cov is None:
        raise ValueError("allocation='output' needs each layer's weight W0 and covariance C")
    w, c = weight.detach().double(), cov.double().to(weight.device)
    out_energy = float(((w @ c) * w).sum())  # tr(W0 C W0^T)
    gain = float(torch.linalg.matrix_norm(w, ord=2)) ** 2
    return lam * (gain / out_energy) if out_energy > 0 else torch.zeros_like(lam)


def water_fill(scores: Mapping[str, Tensor], budget: int, caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """``k_l``: 1 per layer, then the ``budget - L`` largest ``scores[l][i]`` (i >= 1, i < cap_l) over all layers.

    ``scores[l]`` must be non-increasing (a prefix is taken per layer). ``budget`` is clamped to
    ``[L, sum_l cap_l]``.
    """
    names = list(scores)
    caps = {n: min(int((caps or {}).get(n, scores[n].numel())), scores[n].numel()) for n in names}
    if any(c < 1 for c in caps.values()):
        raise ValueError(f"water_fill: every layer needs at least one direction, got caps {caps}")
    ks = dict.fromkeys(names, 1)
    extra = max(0, min(budget, sum(caps.values())) - len(names))
    if extra == 0:
        return ks
    values = torch.cat([scores[n].double().cpu()[1 : caps[n]] for n in names])
    owner = torch.cat([torch.full((caps[n] - 1,), j, dtype=torch.long) for j, n in enumerate(names)])
    order = torch.sort(values, descending=True, stable=True).indices[:extra]
    for j, count in zip(*torch.unique(owner[order], return_counts=True), strict=True):
        ks[names[int(j)]] += int(count)
    return ks


def allocate_ranks(
    spectra: Mapping[str, Tensor],
    energy: float,
    allocation: Allocation,
    weights: Mapping[str, Tensor] | None = None,
    covariances: Mapping[str, Tensor] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Each layer's k: the energy rule's total ``B = sum_l k_l^energy`` water-filled by :func:`layer_scores`.

    ``spectra``: layer name -> its covariance's eigenvalues (descending); ``weights`` / ``covariances``:
    W0 and C per layer (``"output"`` only).
    """
    if allocation == "energy":
        raise ValueError("allocate_ranks: allocation='energy' is the per-layer rule itself; use select_rank")
    caps = {n: lam.numel() if max_rank is None else min(max_rank, lam.numel()) for n, lam in spectra.items()}
    budget = sum(max(1, min(energy_rank(lam, energy), caps[n])) for n, lam in spectra.items())
    scores = {
        n: layer_scores(
            lam,
            allocation,
            None if weights is None else weights[n],
            None if covariances is None else covariances[n],
        )
        for n, lam in spectra.items()
    }
    return water_fill(scores, budget, caps)


def allocate_from_covariances(
    covariances: Covariances,
    weights: Mapping[str, Tensor],
    energy: float,
    allocation: Allocation,
    max_rank: int | None = None,
) -> dict[str, int]:
    """:func:`allocate_ranks` for every layer in ``weights``; one ``eigvalsh`` per shared covariance."""
    owners = {n: covariances.owner[n] for n in weights}
    evals = {o: torch.linalg.eigvalsh(covariances.covariance(o).double()).flip(0) for o in set(owners.values())}
    covs = {n: covariances.covariance(n) for n in weights} if allocation == "output" else None
    return allocate_ranks({n: evals[o] for n, o in owners.items()}, energy, allocation, weights, covs, max_rank)
