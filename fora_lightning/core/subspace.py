"""Per-layer protected subspaces: the function basis Q, the weight's top singular triplets, anchors.

    Q   = top-k eigenvectors of the input covariance C (``source="activations"``), or the top-k
          right singular vectors of W0 (``source="weights"``, the weight-space baseline), or a
          random orthonormal k-frame (``source="random"``, the control);
    U_r, S_r, V_r = top-r singular triplets of W0 (left projector and spectral channel);
    A0  = W0 Q  and  B0 = U_r^T W0  (anchors for the post-step re-projection).

Plain torch: no Lightning import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.energy import cumulative_energy, energy_rank
from fora_lightning.core.projection import AllReduce, anchors
from fora_lightning.core.sharding import Split

Source = Literal["activations", "weights", "random", "none"]
RankSpec = int | Mapping[str, int] | None


@dataclass
class SubspaceConfig:
    """How the bases are chosen (FORA.md, steps 2-3); each field's help says what it does.

    Metadata: ``help``; ``tier`` (``"bases"``: they all shape the bases, see ``fora_lightning.config``);
    ``lora_layer``: the field also fixes FORA-LoRA's layer shapes.
    """

    energy: float = field(
        default=0.99,
        metadata={
            "help": "keep the smallest k whose eigenvalues hold this fraction of the trace (GPM's rule)",
            "tier": "bases",
        },
    )
    rank: RankSpec = field(
        default=None,
        metadata={"help": "a fixed k instead of energy (int >= 1, or a per-layer mapping name -> k)", "tier": "bases"},
    )
    max_rank: int | None = field(default=None, metadata={"help": "cap on k (int >= 1)", "tier": "bases"})
    weight_rank: int = field(
        default=8,
        metadata={
            "help": "r, top singular triplets of W0 protected (0 turns off the left projector and the channel)",
            "tier": "bases",
            "lora_layer": True,
        },
    )
    source: Source = field(
        default="activations",
        metadata={
            "help": "'activations' (FORA), 'weights' (weight-space baseline), 'random' (control), 'none' (k = 0: plain LoRA)",
            "tier": "bases",
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of source='random'", "tier": "bases"})

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy}")
        if self.source not in ("activations", "weights", "random", "none"):
            raise ValueError(f"source must be 'activations', 'weights', 'random' or 'none', got {self.source!r}")
        if not _is_int(self.weight_rank) or self.weight_rank < 0:
            raise ValueError(f"weight_rank must be an int >= 0, got {self.weight_rank!r}")
        if self.max_rank is not None and (not _is_int(self.max_rank) or self.max_rank < 1):
            raise ValueError(
                f"max_rank must be an int >= 1 (or None for no cap), got {self.max_rank!r}: 0 protects nothing"
            )
        ranks = (
            self.rank.items() if isinstance(self.rank, Mapping) else [("", self.rank)] if self.rank is not None else []
        )
        for layer, k in ranks:
            where = f" for layer '{layer}'" if layer else ""
            if not _is_int(k):
                raise ValueError(f"rank must be a whole number of directions (or None to use energy), got {k!r}{where}")
            if k < 1:
                raise ValueError(f"rank must be >= 1 (or None to use energy), got {k}{where}: k = 0 protects nothing")

    def rank_for(self, name: str) -> int | None:
        if isinstance(self.rank, Mapping):
            if name not in self.rank:
                raise ValueError(f"rank is a per-layer mapping but has no entry for layer '{name}'")
            return int(self.rank[name])
        return self.rank


@dataclass
class LayerSubspace:
    """The protected subspaces of one linear layer (``d_out x d_in``).

    ``basis`` is Q (``d_in x k``) or, when ``complement``, an orthonormal basis of span(Q)'s
    complement (``d_in x (d_in - k)``; cheaper when k > d_in/2: gradient mode, or update mode with the
    anchors on the host).
    ``u, s, v`` are ``d_out x r``, ``r``, ``d_in x r``; ``anchor_q = W0 Q``, ``anchor_u = U^T W0``;
    ``anchor_basis`` is Q itself (an orthonormal basis of span(C)'s complement) when ``basis`` is C and anchors are set;
    ``anchors_on_host``: ``anchor_q`` / ``anchor_basis`` are held in host memory (``offload_anchors``).
    ``delta`` (r) is the spectral channel's running coordinate ``diag(U^T (W - W0) V)`` kept by the layer-by-layer
    step projection (``reprojection='step'``, no anchors); ``split``: ``basis``, ``u``, ``v`` hold only this rank's rows.
    ``energy`` is the fraction of the covariance trace span(Q) holds; ``spectrum`` the eigenvalues
    (descending, for inspection).
    """

    d_out: int
    d_in: int
    k: int
    basis: Tensor
    complement: bool
    u: Tensor
    s: Tensor
    v: Tensor
    energy: float = float("nan")
    spectrum: Tensor | None = None
    anchor_q: Tensor | None = None
    anchor_u: Tensor | None = None
    anchor_basis: Tensor | None = None
    anchors_on_host: bool = False
    delta: Tensor | None = None
    split: Split | None = None

    @property
    def r(self) -> int:
        return self.u.shape[1]

    def full(self, name: str) -> Tensor:
        """Field ``name`` whole: under a :class:`~fora_lightning.core.sharding.Split` the rows of ``basis``, ``u``, ``v``
        and ``spectrum`` are gathered from every rank (a collective: call it on all ranks in the same order)."""
        t = getattr(self, name)
        if self.split is None or name not in SPLIT_FIELDS:
            return t
        return self.split.gather(t, self.d_out if name == "u" else self.d_in)

    def shard(self, split: Split, local: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        """Keep only this rank's rows of ``basis``, ``u``, ``v`` and ``spectrum`` (``local``: a cache ``id(full basis) -> rows``,
        so that q/k/v sharing one basis tensor keep sharing its rows; it keeps the full tensor alive, so an id is never reused)."""
        if self.split is not None:
            return
        cache = {} if local is None else local
        entry = cache.get(id(self.basis))
        if entry is None or entry[0] is not self.basis:  # the cache holds the full tensor: its id cannot be reused
            entry = cache[id(self.basis)] = (self.basis, split.local(self.basis))
        self.basis, self.u, self.v = entry[1], split.local(self.u), split.local(self.v)
        if self.spectrum is not None:
            self.spectrum = split.local(self.spectrum)
        self.split = split

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def nbytes(self, host: bool = True) -> int:
        """Persistent bytes held (bases and anchors; the spectrum excluded); ``host=False``: those of the
        training device only (without :data:`HOST_FIELDS` when ``anchors_on_host``)."""
        skip = {"spectrum"} | (set(HOST_FIELDS) if self.anchors_on_host and not host else set())
        return sum(t.numel() * t.element_size() for n, t in self.tensors().items() if n not in skip)

    def to(self, device: torch.device | str, anchors_on_host: bool = False) -> LayerSubspace:
        """Every tensor to ``device``; with ``anchors_on_host`` :attr:`HOST_FIELDS` to host memory instead
        (pinned when CUDA is available, so that the per-step copies to the device are asynchronous)."""
        for n, t in self.tensors().items():
            setattr(self, n, to_host(t) if anchors_on_host and n in HOST_FIELDS else t.to(device))
        self.anchors_on_host = anchors_on_host and self.anchor_q is not None
        return self

    @property
    def reprojection_basis(self) -> Tensor:
        """Q for the re-projection ``W <- W - (W Q - A0) Q^T - ...``: ``basis``, or ``anchor_basis`` when ``basis`` is C."""
        return self.anchor_basis if self.complement else self.basis

    def attach_anchors(
        self,
        weight: Tensor,
        u: Tensor | None = None,
        all_reduce: AllReduce | None = None,
        on_host: bool = False,
        shared: dict[int, Tensor] | None = None,
    ) -> None:
        """Store ``A0 = W0 Q`` and ``B0 = U^T W0`` (:func:`~fora_lightning.core.projection.anchors`) from the
        weight at fit start. For a row shard of W0 pass its rows of ``U`` and the shard group's ``all_reduce``.

        ``on_host``: ``A0`` (and, for a complement ``basis`` C, ``anchor_basis`` = Q = ``complement_basis(C)``,
        any orthonormal basis of span(C)'s complement: ``Q Q^T = I - C C^T``) live in host memory; the device then
        holds ``min(k, d_in - k) x d_in`` of basis per input plus ``U, S, V, B0``. A complement needs ``on_host``.
        ``shared``: a cache ``id(C) -> Q`` so that layers sharing C (q/k/v, gate/up) share one Q too.
        """
        if self.complement and not on_host:
            raise ValueError(
                "anchors need Q itself, not its complement: estimate this subspace with allow_complement=False, "
                "or keep the anchors on the host (offload_anchors=True), where Q is rebuilt from the complement"
            )
        q, cache = self.basis, {} if shared is None else shared
        if self.complement:
            if id(self.basis) not in cache:
                cache[id(self.basis)] = complement_basis(self.basis)
            q = cache[id(self.basis)]
        self.anchor_q, self.anchor_u = anchors(weight, q, self.u if u is None else u, all_reduce=all_reduce)
        self.anchor_basis = q if self.complement else None
        self.anchors_on_host = on_host
        if on_host:
            self.anchor_q = to_host(self.anchor_q)
            if self.complement:
                if -id(self.basis) not in cache:  # the host copy, shared as well
                    cache[-id(self.basis)] = to_host(q)
                self.anchor_basis = cache[-id(self.basis)]


HOST_FIELDS = ("anchor_q", "anchor_basis")  # what ``offload_anchors`` keeps in host memory
SPLIT_FIELDS = ("basis", "u", "v", "spectrum")  # what a Split keeps by rows


def to_host(t: Tensor) -> Tensor:
    """``t`` in CPU memory, pinned when CUDA is available (asynchronous copies back to the device)."""
    t = t.detach().to("cpu")
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


def select_rank(
    eigenvalues: Tensor, energy: float = 0.99, rank: int | None = None, max_rank: int | None = None, name: str = ""
) -> int:
    """k from a descending spectrum: fixed ``rank`` (clamped to d with a warning), else the smallest k
    with ``sum_{i<k} lambda_i >= energy * sum_i lambda_i``; then capped by ``max_rank``."""
    d = eigenvalues.numel()
    if rank is not None:
        if rank > d:
            warnings.warn(f"FORA: rank={rank} exceeds d_in={d} for layer '{name}'; clamped to {d}", stacklevel=2)
        k = max(0, min(int(rank), d))
    else:
        k = energy_rank(eigenvalues, energy)
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def spectrum(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, in float64."""
    evals, evecs = torch.linalg.eigh(cov.double())
    return evals.flip(0), evecs.flip(1)


def weight_triplets(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets ``(U_r, S_r, V_r)`` of ``weight`` (float64, float32 result).

    For ``4 r <= min(d_out, d_in)`` they come from the float64 eigendecomposition of the smaller
    Gram matrix (``W^T W = V S^2 V^T``, ``U = W V / S``; or ``W W^T`` for a wide W), about 3x
    faster than a full SVD. A full SVD is used for larger r, and when ``S_r < 1e-4 S_1`` (there the
    squared spectrum would cost accuracy and ``W V / S`` orthogonality).
    """
    r = min(r, *weight.shape)
    if r == 0:
        d_out, d_in = weight.shape
        z = weight.new_zeros
        return z(d_out, 0, dtype=torch.float32), z(0, dtype=torch.float32), z(d_in, 0, dtype=torch.float32)
    w = weight.detach().double()
    if 4 * r <= min(w.shape):
        tall = w.shape[0] >= w.shape[1]
        evals, evecs = torch.linalg.eigh(w.T @ w if tall else w @ w.T)
        top, s = evecs[:, -r:].flip(1), evals[-r:].flip(0).clamp_min(0).sqrt()
        if s[-1] >= 1e-4 * s[0]:
            other = (w @ top if tall else w.T @ top) / s
            u, v = (other, top) if tall else (top, other)
            return u.float().contiguous(), s.float().contiguous(), v.float().contiguous()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r].float().contiguous(), s[:r].float().contiguous(), vh[:r].T.float().contiguous()


def complement_basis(q: Tensor, evecs: Tensor | None = None) -> Tensor:
    """An orthonormal basis of span(q)'s complement: the trailing eigenvectors when given, else via QR."""
    d, k = q.shape
    if evecs is not None:
        return evecs[:, k:].contiguous()
    full, _ = torch.linalg.qr(torch.cat([q.double(), torch.eye(d, dtype=torch.float64, device=q.device)], 1))
    return full[:, k:d].to(q.dtype).contiguous()


def _random_frame(d: int, k: int, seed: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen, dtype=torch.float64))
    return q[:, :k].to(device)


def build_subspace(
    name: str,
    weight: Tensor,
    config: SubspaceConfig,
    spectrum_: tuple[Tensor, Tensor] | None = None,
    allow_complement: bool = False,
    seed_offset: int = 0,
) -> LayerSubspace:
    """One layer's subspaces from its weight and (for ``source="activations"``) its covariance spectrum."""
    d_out, d_in = weight.shape
    need_svd = config.weight_rank > 0 or config.source == "weights"
    if need_svd:
        r_svd = max(config.weight_rank, d_in if config.source == "weights" else 0)
        u_all, s_all, v_all = weight_triplets(weight, min(r_svd, d_out, d_in))
    evals = evecs = None
    if config.source == "activations":
        if spectrum_ is None:
            raise ValueError(f"layer '{name}': source='activations' needs its covariance spectrum")
        evals, evecs = spectrum_
        k = select_rank(evals, config.energy, config.rank_for(name), config.max_rank, name)
        q = evecs[:, :k]
    elif config.source == "weights":
        evals = torch.zeros(d_in, dtype=torch.float64, device=s_all.device)
        evals[: s_all.numel()] = s_all.double() ** 2  # right singular vectors = eigvecs of W0^T W0
        k = select_rank(evals, config.energy, config.rank_for(name), config.max_rank, name)
        q = v_all[:, :k].double()
        if k > v_all.shape[1]:
            q = torch.cat([q, complement_basis(v_all.double())[:, : k - v_all.shape[1]]], 1)
    elif config.source == "none":
        k, q = 0, torch.zeros(d_in, 0, dtype=torch.float64, device=weight.device)
    else:
        k_req = config.rank_for(name)
        if k_req is None:
            raise ValueError("source='random' needs an explicit rank (int or per-layer mapping)")
        k = select_rank(torch.ones(d_in, device=weight.device), 1.0, k_req, config.max_rank, name)
        q = _random_frame(d_in, k, config.seed + seed_offset, weight.device)
    energy = float("nan") if evals is None else float(cumulative_energy(evals)[k - 1]) if k > 0 else 0.0
    complement = allow_complement and k > d_in / 2
    basis = complement_basis(q, evecs if config.source == "activations" else None) if complement else q
    r = min(config.weight_rank, d_out, d_in)
    if need_svd:
        u, s, v = u_all[:, :r].contiguous(), s_all[:r].contiguous(), v_all[:, :r].contiguous()
    else:
        u, s, v = weight_triplets(weight, 0)
    return LayerSubspace(
        d_out=d_out,
        d_in=d_in,
        k=k,
        basis=basis.float().contiguous(),
        complement=complement,
        u=u.to(weight.device),
        s=s.to(weight.device),
        v=v.to(weight.device),
        energy=energy,
        spectrum=evals.float() if evals is not None else None,
    )


def estimate_subspaces(
    weights: Mapping[str, Tensor],
    config: SubspaceConfig,
    covariances: Covariances | None = None,
    spectra: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    allow_complement: bool = False,
) -> dict[str, LayerSubspace]:
    """Subspaces for every layer in ``weights`` (name -> W0, full ``d_out x d_in``).

    With ``source="activations"`` the covariance spectra are computed once per shared input
    (``spectra`` may be given precomputed, keyed by covariance owner, e.g. by a distributed eigh).
    Computed here, each ``d_in x d_in`` float64 eigenvector matrix is held only until the last
    layer reading that input is built, not all of them at once.
    """
    if config.source == "activations" and covariances is None:
        raise ValueError("source='activations' needs calibration covariances")
    owners = {n: covariances.owner[n] for n in weights} if config.source == "activations" else {}
    last_reader = {o: n for n, o in owners.items()}
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    out: dict[str, LayerSubspace] = {}
    shared: dict[tuple[str, int, bool], Tensor] = {}
    for i, (name, w) in enumerate(weights.items()):
        owner = owners.get(name)
        sp = None
        if owner is not None:
            sp = spectra[owner] if spectra is not None else cache.get(owner)
            if sp is None:
                sp = cache[owner] = spectrum(covariances.covariance(owner))
        sub = build_subspace(name, w, config, sp, allow_complement, seed_offset=i)
        if owner is not None:  # q/k/v (gate/up) with the same k hold one basis tensor
            sub.basis = shared.setdefault((owner, sub.k, sub.complement), sub.basis)
            if last_reader[owner] == name:
                cache.pop(owner, None)
        out[name] = sub
    return out


def nbytes_summary(subspaces: Mapping[str, LayerSubspace], host: bool = True, spectrum: bool = False) -> int:
    """Persistent bytes of all layers' bases and anchors (this rank's, under a Split), each tensor counted once
    (q/k/v share one basis); ``host=False``: device memory only; ``spectrum``: the eigenvalues too."""
    seen: dict[int, int] = {}
    for s in subspaces.values():
        skip = set() if spectrum else {"spectrum"}
        if s.anchors_on_host and not host:
            skip |= set(HOST_FIELDS)
        for n, t in s.tensors().items():
            if n not in skip:
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def format_summary(
    subspaces: Mapping[str, LayerSubspace], model_param_bytes: int | None = None, channel_bound: float | None = None
) -> str:
    """A one-screen table: layer, d_out x d_in, k (or complement), r, energy kept, bytes; then the channel's bound."""
    rows = [f"{'layer':<48} {'d_out x d_in':>13} {'k':>6} {'r':>4} {'energy':>8} {'MiB':>8}"]
    for name, s in subspaces.items():
        k = f"{s.k}{'c' if s.complement else ''}"
        e = "-" if math.isnan(s.energy) else f"{s.energy:.4f}"
        rows.append(f"{name[-48:]:<48} {f'{s.d_out}x{s.d_in}':>13} {k:>6} {s.r:>4} {e:>8} {s.nbytes() / 2**20:>8.3f}")
    total = nbytes_summary(subspaces, spectrum=True)
    world = max((s.split.world for s in subspaces.values() if s.split is not None), default=1)
    state = 16 * sum(s.d_out * s.d_in for s in subspaces.values()) / world  # float32 W, grad, two AdamW moments
    where = f" per rank (split over {world} ranks)" if world > 1 else ""
    tail = f"{len(subspaces)} layers protected; FORA keeps {total / 2**20:.2f} MiB{where}"
    if state:
        tail += f": {100 * total / state:.2f}% of their full fine-tuning training state (16 bytes per parameter)"
    if model_param_bytes:
        tail += f", {100 * total * world / model_param_bytes:.2f}% of the model's parameter bytes"
    rows.append(tail)
    if any(s.r > 0 for s in subspaces.values()):
        rows.append(channel_line(channel_bound))
    return "\n".join(rows)


def channel_line(channel_bound: float | None) -> str:
    """What the spectral channel guarantees on span(Q) under ``channel_bound``."""
    if channel_bound is None:
        return "spectral channel unbounded (channel_bound=None): on span(Q) the output moves by U_r diag(delta) V_r^T x, delta free"
    return (
        f"spectral channel bounded: |delta_i| <= {channel_bound:g} S_i, so ||(W - W0) x|| <= {channel_bound:g} ||W0 x|| "
        "for every x in span(Q), every layer"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
