"""FORA's own state split by rows over a process group, as FSDP splits parameters (plain torch, no Lightning).

Under FSDP each rank keeps ``1/W`` of every layer's bases (``Q`` or its complement, ``d_in x k``), ``V``
(``d_in x r``) and ``U`` (``d_out x r``): rows split as ``torch.chunk`` splits them (FSDP2's ``Shard(0)`` rule, so a
rank's rows of ``U`` are the rows of the weight it holds). :meth:`Split.gather` rebuilds one full tensor just before
it is used and the caller drops it after, one layer (or one input shared by q/k/v) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor


def chunk_range(n: int, index: int, parts: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``n`` rows are split as ``torch.chunk(_, parts)`` does.

    Chunks hold ``ceil(n / parts)`` rows; trailing chunks may be shorter or empty (5 over 2: 3 + 2).
    """
    size = -(-n // parts) if n else 0
    start = min(index * size, n)
    return start, min(start + size, n)


@dataclass(frozen=True)
class Split:
    """Rows split over ``group`` (``world`` ranks, this one ``rank``): rank ``i`` holds ``torch.chunk``'s chunk ``i``."""

    rank: int
    world: int
    group: Any = None

    def local(self, t: Tensor) -> Tensor:
        """This rank's rows of a full tensor (a contiguous copy, so the full one can be freed)."""
        start, stop = chunk_range(t.shape[0], self.rank, self.world)
        return t[start:stop].contiguous().clone()

    def gather(self, local: Tensor, n_rows: int) -> Tensor:
        """The full ``n_rows x ...`` tensor from every rank's rows: one all-gather (padded to the largest chunk)."""
        size = -(-n_rows // self.world) if n_rows else 0
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: local.shape[0]] = local
        full = local.new_empty((size * self.world, *local.shape[1:]))
        dist.all_gather_into_tensor(full, padded, group=self.group)
        return full[:n_rows]
