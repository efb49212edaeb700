"""Several capabilities and chained fine-tunes: the algebra of combining protected subspaces.

For capabilities ``c`` with input sums ``S_c`` over ``N_c`` tokens (per layer input):

    combined covariance   C = sum_c w_c C_c / sum_c w_c,   C_c = S_c / N_c
                          (each normalised by its own token count, so a big set cannot drown a small one);
    union of bases        span(Q) = span(Q_1, ..., Q_m), Q_c chosen by the energy rule on C_c alone,
                          re-orthonormalised and ordered by C's Rayleigh quotients;
    GPM extension         [Q, Q_new], Q_new = top eigenvectors of the residual (I - QQ^T) C' (I - QQ^T)
                          of a new capability's covariance C', the fewest with
                          tr(Q^T C' Q) + sum_{i<k'} lambda_i >= energy * tr(C')   (Saha et al., 2021).

Plain torch: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.energy import captured_energy, energy_rank
from fora_lightning.core.subspace import LayerSubspace, complement_basis, select_rank, spectrum, weight_triplets

_RANK_TOL = 1e-6


def capability_weights(names: Sequence[str], weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weights ``w_c / sum_c w_c`` for ``names`` (equal when ``weights`` is None).

    Raises ``ValueError`` naming the capability for a missing, unknown, negative or non-finite
    weight, and when all weights are zero.
    """
    if not names:
        raise ValueError("no capabilities: give at least one calibration loader")
    if weights is None:
        return {n: 1.0 / len(names) for n in names}
    missing = [n for n in names if n not in weights]
    unknown = [n for n in weights if n not in names]
    if missing or unknown:
        raise ValueError(
            f"capability_weights must name exactly the calibration capabilities {list(names)}: "
            f"missing {missing}, unknown {unknown}"
        )
    for n in names:
        w = float(weights[n])
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"capability_weights['{n}'] = {weights[n]!r}; weights must be finite and >= 0")
    total = sum(float(weights[n]) for n in names)
    if total <= 0:
        raise ValueError(f"capability_weights {dict(weights)} are all zero")
    return {n: float(weights[n]) / total for n in names}


def combine_covariances(
    per_capability: Mapping[str, Covariances], weights: Mapping[str, float] | None = None
) -> Covariances:
    """``C = sum_c w_c S_c / N_c`` (weights normalised to sum 1) per layer input.

    The result's ``counts`` are the total token counts ``sum_c N_c`` and its ``sums`` are
    ``(sum_c N_c) * C``, so ``result.covariance(name) == C``. All capabilities must have seen
    the same layers with the same shared inputs; otherwise ``ValueError`` names the layer.
    """
    names = list(per_capability)
    w = capability_weights(names, weights)
    first = per_capability[names[0]]
    for n in names[1:]:
        other = per_capability[n].owner
        for layer in sorted(set(first.owner) | set(other)):
            if first.owner.get(layer) != other.get(layer):
                raise ValueError(
                    f"capabilities '{names[0]}' and '{n}' disagree on layer '{layer}': its covariance owner is "
                    f"{first.owner.get(layer)!r} vs {other.get(layer)!r} (a layer unreached or an input shared differently)"
                )
    out = Covariances(owner=dict(first.owner))
    for o in first.sums:
        total_n = sum(per_capability[n].counts[o] for n in names)
        acc = torch.zeros_like(first.sums[o], dtype=torch.float64)
        for n in names:
            if w[n] > 0:
                acc += w[n] * per_capability[n].covariance(o).double()
        out.sums[o] = (acc * max(total_n, 1)).to(first.sums[o].dtype)
        out.counts[o] = total_n
    return out


def _ordered_frame(span: Tensor, rest: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """A full orthonormal frame ``[span R1, rest R2]``, each block rotated to diagonalise ``cov``; values descending per block."""
    blocks, values = [], []
    for b in (span, rest):
        if b.shape[1] == 0:
            continue
        lam, rot = torch.linalg.eigh(b.T @ cov @ b)
        blocks.append(b @ rot.flip(1))
        values.append(lam.flip(0))
    return torch.cat(values), torch.cat(blocks, 1)


def union_frame(
    covariances: Sequence[Tensor],
    weights: Sequence[float],
    energy: float = 0.99,
    rank: int | None = None,
    name: str = "",
) -> tuple[Tensor, Tensor, int]:
    """The union of per-capability bases as a full frame: ``(values, E, k)`` with ``E`` (d x d) orthonormal.

    Each capability with a positive weight gets its own ``Q_c`` (top-k_c eigenvectors of ``C_c``, k_c
    by ``select_rank(energy, rank)``). ``E[:, :k]`` is an orthonormal basis of ``span(Q_1, ..., Q_m)``
    (directions with singular value below 1e-6 of the stacked frame dropped as duplicates), rotated
    so that ``values = diag(E^T C E)`` is descending within it, ``C = sum_c w_c C_c``; the remaining
    columns span the complement, ordered the same way. ``values[:k].sum() / values.sum()`` is then
    the fraction of ``C`` that span(Q) holds. All in float64.
    """
    covs = [c.double() for c in covariances]
    d = covs[0].shape[0]
    total_w = sum(weights)
    combined = sum(w / total_w * c for w, c in zip(weights, covs))
    parts = []
    for w, c in zip(weights, covs):
        if w <= 0:
            continue
        evals, evecs = spectrum(c)
        parts.append(evecs[:, : select_rank(evals, energy, rank, None, name)])
    stacked = torch.cat(parts, 1) if parts else combined.new_zeros(d, 0)
    if stacked.shape[1] == 0:
        u, k = torch.eye(d, dtype=torch.float64, device=combined.device), 0
    else:
        u, sv, _ = torch.linalg.svd(stacked, full_matrices=True)
        k = int((sv > _RANK_TOL * sv[0]).sum())
    values, frame = _ordered_frame(u[:, :k], u[:, k:], combined)
    return values, frame, k


def gpm_extend(basis: Tensor, cov: Tensor, energy: float = 0.99, max_new: int | None = None) -> tuple[Tensor, int]:
    """``([Q, Q_new], k_new)``: the GPM merge of a new capability's covariance ``C'`` into span(Q).

    ``Q_new`` are the top eigenvectors of the residual ``R = P C' P`` (``P = I - QQ^T``), the fewest
    with ``tr(Q^T C' Q) + sum_{i<k_new} lambda_i(R) >= energy * tr(C')``, at most ``max_new`` and only
    eigenvalues > 0; none when span(Q) already holds that much. ``Q_new`` is re-orthogonalised against
    ``Q`` (float64), so the result is orthonormal. ``basis`` is ``d x k``; the result has ``basis``'s dtype.
    """
    q = basis.double()
    c = cov.double()
    d = c.shape[0]
    total = float(torch.trace(c).clamp_min(0))
    if total <= 0:
        return basis, 0
    held = captured_energy(q, c)
    if held >= energy - 1e-12:
        return basis, 0
    cq = c @ q
    residual = c - q @ cq.T - cq @ q.T + q @ (q.T @ cq) @ q.T
    lam, vecs = spectrum(0.5 * (residual + residual.T))
    lam = lam.clamp_min(0)
    available = int((lam > _RANK_TOL * max(float(lam[0]), 1e-300)).sum())
    k_new = energy_rank(lam, energy, total, held)
    k_new = min(k_new, available, d - q.shape[1], max_new if max_new is not None else d)
    if k_new <= 0:
        return basis, 0
    new = vecs[:, :k_new]
    new = new - q @ (q.T @ new)
    new, _ = torch.linalg.qr(new)
    return torch.cat([q, new], 1).to(basis.dtype), k_new


def principal_cosines(basis: Tensor, v: Tensor, complement: bool = False) -> Tensor:
    """Cosines of the principal angles between span(Q) and span(V) (descending, ``min(k, r)`` of them).

    ``cos theta_i`` are the singular values of ``Q^T V``; with a complement basis ``B`` of span(Q)
    they are ``sqrt(eig(I - V^T B B^T V))``. Float64.
    """
    b, vv = basis.double(), v.double()
    if vv.shape[1] == 0:
        return vv.new_zeros(0)
    if complement:
        k = b.shape[0] - b.shape[1]
        outside = vv.T @ b
        cos2 = torch.linalg.eigvalsh(
            torch.eye(vv.shape[1], dtype=torch.float64, device=vv.device) - outside @ outside.T
        ).flip(0)
        return cos2.clamp(0, 1).sqrt()[: min(k, vv.shape[1])]
    return torch.linalg.svdvals(b.T @ vv).clamp(0, 1)


def union_spectra(
    per_capability: Mapping[str, Covariances],
    energy: float,
    rank: int | Mapping[str, int] | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, int]]:
    """:func:`union_frame` for every covariance owner: ``(owner -> (values, E), layer -> k)``.

    Shaped like ``estimate_subspaces``'s precomputed ``spectra``; pass the ``k`` mapping as its
    ``rank`` so each layer keeps exactly the union (then capped by ``max_rank``). A per-layer
    ``rank`` mapping is read at the owner (the first layer reading that input).
    """
    names = list(per_capability)
    w = capability_weights(names, weights)
    first = per_capability[names[0]]
    spectra: dict[str, tuple[Tensor, Tensor]] = {}
    ks: dict[str, int] = {}
    for owner in first.sums:
        r = rank.get(owner) if isinstance(rank, Mapping) else rank
        values, frame, k = union_frame(
            [per_capability[n].covariance(owner) for n in names], [w[n] for n in names], energy, r, owner
        )
        spectra[owner] = (values, frame)
        ks[owner] = k
    return spectra, {layer: ks[o] for layer, o in first.owner.items()}


@dataclass(frozen=True)
class GrownBasis:
    """The weight-independent half of :func:`extend_subspace`: one per shared input (q/k/v, gate/up)."""

    basis: Tensor  # float32, Q or its complement
    complement: bool
    k: int
    k_new: int
    energy: float
    spectrum: Tensor  # eigenvalues of the new covariance, float32


def grow_basis(
    sub: LayerSubspace, cov: Tensor, energy: float = 0.99, max_rank: int | None = None, allow_complement: bool = False
) -> GrownBasis:
    """``sub``'s Q grown by :func:`gpm_extend` with ``cov`` (``max_rank`` caps the merged k)."""
    q = complement_basis(sub.basis) if sub.complement else sub.basis
    max_new = None if max_rank is None else max(0, max_rank - q.shape[1])
    merged, k_new = gpm_extend(q.to(cov.device), cov, energy, max_new)
    k = merged.shape[1]
    complement = allow_complement and k > sub.d_in / 2
    evals, _ = spectrum(cov)
    return GrownBasis(
        basis=(complement_basis(merged) if complement else merged).float().contiguous(),
        complement=complement,
        k=k,
        k_new=k_new,
        energy=captured_energy(merged, cov),
        spectrum=evals.float(),
    )


def extend_subspace(
    sub: LayerSubspace,
    weight: Tensor,
    cov: Tensor,
    energy: float = 0.99,
    weight_rank: int = 8,
    max_rank: int | None = None,
    allow_complement: bool = False,
    grown: GrownBasis | None = None,
) -> tuple[LayerSubspace, int]:
    """One layer of a chained fine-tune: ``sub``'s Q grown by :func:`gpm_extend` with the new covariance.

    ``weight`` is the tuned weight (the next run's W0): ``U_r, S_r, V_r`` are recomputed from it.
    ``max_rank`` caps the merged k (old directions are never dropped). ``energy`` of the result is
    the fraction of ``cov`` the merged span holds; ``spectrum`` is ``cov``'s. ``grown``: the
    :func:`grow_basis` result when layers reading the same input (q/k/v) share it. Returns ``(subspace, k_new)``.
    """
    grown = grown if grown is not None else grow_basis(sub, cov, energy, max_rank, allow_complement)
    u, s, v = weight_triplets(weight, weight_rank)
    d_out, d_in = weight.shape
    return (
        LayerSubspace(
            d_out=d_out,
            d_in=d_in,
            k=grown.k,
            basis=grown.basis,
            complement=grown.complement,
            u=u,
            s=s,
            v=v,
            energy=grown.energy,
            spectrum=grown.spectrum,
        ),
        grown.k_new,
    )
