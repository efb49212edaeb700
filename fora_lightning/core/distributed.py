"""Distributed helpers for FORA, in plain torch (no Lightning import).

* :func:`spread_spectra` spreads the covariance eigendecompositions over ranks: each covariance
  owner is assigned to one rank (greedy on the ``d^3`` cost), the ranks run their ``eigh`` in
  parallel, then each spectrum is broadcast and handed to the caller one at a time, so a rank holds
  its own share plus one received spectrum, never all of them.
* :class:`RowShard` describes the rows of a ``d_out x d_in`` weight held by this rank under FSDP2
  (DTensor ``Shard(0)``, rows split as ``torch.chunk`` does, uneven sizes included). The right
  projection ``G Q`` is row-local; ``U^T G`` is the one cross-row quantity, summed by
  :meth:`RowShard.all_reduce` (an ``r x d_in`` tensor).
* :class:`RankShare` deals the calibration batches over ranks.

Public torch APIs only; FSDP1's flat parameters (private internals) are handled by :mod:`fora_lightning.fsdp1`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.sharding import chunk_range
from fora_lightning.core.subspace import spectrum

Spectrum = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------- eigendecompositions
def several_ranks(group: Any = None) -> bool:
    """An initialised process group of more than one rank (``group``, default the world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def assign_owners(dims: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Owner name -> rank, balancing the ``d^3`` eigh cost greedily (largest first, ties by name)."""
    load = [0.0] * world_size
    out: dict[str, int] = {}
    for name in sorted(dims, key=lambda n: (-dims[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += float(dims[name]) ** 3
    return out


def spread_spectra(covariances: Covariances, group: Any = None) -> Iterator[tuple[str, Spectrum]]:
    """``(owner, (eigenvalues desc, eigenvectors))`` for every covariance owner in sorted order, each computed on one rank.

    Every rank must hold the same (all-reduced) covariances and consume the iterator to the end (the
    broadcasts pair up across ranks). Each rank first decomposes the owners assigned to it, in parallel
    with the others; then owner by owner the result is broadcast and yielded, and the computing rank drops
    its copy. Drop each spectrum once used: on Qwen3-1.7B all of them together are 10.5 GiB of float64.
    Without an initialised process group (or with one rank) the spectra are computed one by one here.
    Each equals ``spectrum(covariances.covariance(owner))`` exactly: only the rank that computes differs.
    """
    owners = sorted(covariances.groups())
    if not several_ranks(group):
        for o in owners:
            yield o, spectrum(covariances.covariance(o))
        return
    me, world = dist.get_rank(group), dist.get_world_size(group)
    plan = assign_owners({o: covariances.sums[o].shape[0] for o in owners}, world)
    mine = {o: tuple(t.contiguous() for t in spectrum(covariances.covariance(o))) for o in owners if plan[o] == me}
    for o in owners:
        if plan[o] == me:
            evals, evecs = mine.pop(o)
        else:
            d, device = covariances.sums[o].shape[0], covariances.sums[o].device
            evals = torch.empty(d, dtype=torch.float64, device=device)
            evecs = torch.empty(d, d, dtype=torch.float64, device=device)
        src = plan[o] if group is None else dist.get_global_rank(group, plan[o])
        dist.broadcast(evals, src=src, group=group)
        dist.broadcast(evecs, src=src, group=group)
        yield o, (evals, evecs)


# ---------------------------------------------------------------------------- FSDP2 rows
@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[start, stop)`` of a row-sharded tensor and the groups its rows are split over."""

    start: int
    stop: int
    n_rows: int
    groups: tuple[Any, ...] = ()

    def rows(self, t: Tensor) -> Tensor:
        """The local rows of a full tensor (``t[start:stop]``)."""
        if t.shape[0] != self.n_rows:
            raise ValueError(f"RowShard: tensor has {t.shape[0]} rows, the sharded weight has {self.n_rows}")
        return t[self.start : self.stop]

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` in place over the row-shard groups (``U_local^T X_local`` -> ``U^T X``); returns ``t``."""
        for g in self.groups:
            dist.all_reduce(t, group=g)
        return t

    def gather(self, local: Tensor) -> Tensor:
        """The full tensor from every rank's rows (zeros elsewhere, then summed): a collective."""
        full = local.new_zeros((self.n_rows, *local.shape[1:]))
        full[self.start : self.stop] = local
        return self.all_reduce(full)


def row_shard(param: Tensor) -> RowShard | None:
    """The :class:`RowShard` of a DTensor parameter (``Shard(0)``/``Replicate`` placements), ``None`` for a plain tensor.

    Raises ``ValueError`` for other placements (e.g. tensor parallel ``Shard(1)``, ``Partial``).
    """
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    if not isinstance(param, DTensor):
        return None
    mesh = param.device_mesh
    n = param.shape[0]
    start, length, groups = 0, n, []
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim != 0:
            raise ValueError(
                f"FORA supports row-sharded (Shard(0)) or replicated weights; got placements {param.placements} "
                f"on mesh {mesh.mesh_dim_names or tuple(mesh.shape)} (tensor parallelism is not supported)"
            )
        lo, hi = chunk_range(length, mesh.get_local_rank(dim), mesh.size(dim))
        start, length = start + lo, hi - lo
        groups.append(mesh.get_group(dim))
    return RowShard(start, start + length, n, tuple(groups))


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (``to_local()``: a view of its storage, edits persist), else ``t``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return t
    return t.to_local() if isinstance(t, DTensor) else t


class RankShare:
    """This rank's calibration batches: every ``world_size``-th one from ``rank`` (all of them on one process).

    FSDP (and DDP, which syncs buffers) forwards are collectives, so every rank runs ``ceil(n / world_size)``
    forwards: a rank with fewer batches repeats one outside the collector (``padding``); a rank with none
    collects one whose sums the caller zeroes (``empty``). A loader without ``len`` is run whole on every
    rank and nothing is summed (``sharded`` false): same result, no speed-up.
    """

    def __init__(self, batches: Iterable[Any], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size
        try:
            n = len(batches)  # type: ignore[arg-type]
        except TypeError:
            n = 0
        self.sharded = world_size > 1 and n > 0
        own = len(range(rank, n, world_size)) if self.sharded else 0
        self.empty = self.sharded and own == 0
        self.padding = -(-n // world_size) - max(own, 1) if self.sharded else 0

    def filler(self) -> Any:
        """A batch to run for shape or padding (the loader's first)."""
        for batch in self.batches:
            return batch
        raise ValueError("FORA calibration: the calibration loader yielded no batch")

    def __iter__(self):
        if not self.sharded:
            yield from self.batches
        elif self.empty:
            yield self.filler()
        else:
            for i, batch in enumerate(self.batches):
                if i % self.world_size == self.rank:
                    yield batch

    def __len__(self) -> int:
        if not self.sharded:
            return len(self.batches)  # type: ignore[arg-type]
        return max(len(range(self.rank, len(self.batches), self.world_size)), 1)  # type: ignore[arg-type]
