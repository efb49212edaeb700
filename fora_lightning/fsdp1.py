"""FSDP1 flat parameters: gather one unit's ``FlatParameter`` whole, edit its 2-D views, write the local shard back.

Under ``FSDPStrategy`` a target weight is a slice of one unit's 1-D ``FlatParameter`` (``use_orig_params`` true
or false). :class:`FlatUnit` all-gathers the local shard of the data or the gradient into the unit's full flat
buffer, views it as the original parameters, and after an edit copies this rank's slice back into its shard.
Peak extra memory: one unit's full flat buffer (``numel x element size``). The FSDP1 internals it reads are
:mod:`fora_lightning._compat`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fora_lightning._compat import (
    flat_param_local,
    flat_param_members,
    flat_param_sizes,
    flat_param_views,
    fsdp1_handles,
)


class FlatUnit:
    """One FSDP1 ``FlatParameter``: gather it (or its gradient) whole, edit the 2-D views, write back the shard."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.flat = handle.flat_param

    @property
    def members(self) -> list[tuple[nn.Module, str]]:
        """``(module, parameter name)`` of every original parameter, in flat order."""
        return flat_param_members(self.handle)

    def _local(self, which: Literal["data", "grad"]) -> Tensor | None:
        return self.flat.grad if which == "grad" else flat_param_local(self.handle)

    @contextlib.contextmanager
    @torch.no_grad()
    def gathered(self, which: Literal["data", "grad"], writeback: bool = False) -> Iterator[list[Tensor] | None]:
        """Yield full 2-D views of every original parameter (or gradient); ``None`` if no rank has a gradient.

        A collective over the unit's process group: call it on every rank in the same order.
        With ``writeback``, this rank's slice of the edited buffer is copied back into its shard.
        """
        local = self._local(which)
        sharded = self.handle.uses_sharded_strategy
        if sharded:
            padded, unpadded = flat_param_sizes(self.handle)
            group = self.handle.process_group
            missing = torch.tensor([local is None], dtype=torch.int32, device=self.flat.device)
            dist.all_reduce(missing, group=group)
            if int(missing) == dist.get_world_size(group):
                yield None
                return
            if local is None:
                raise RuntimeError("FORA (FSDP1): some ranks have a gradient for a flat parameter and others none")
            full = local.new_empty(padded)
            dist.all_gather_into_tensor(full, local.contiguous(), group=group)
        elif local is None:
            yield None
            return
        else:  # NO_SHARD (FSDP1 on one process): the local buffer is the whole, unpadded one
            full, unpadded = local, local.numel()
        yield flat_param_views(self.handle, full[:unpadded])
        if writeback and sharded:
            n = local.numel()
            local.copy_(full[dist.get_rank(group) * n : (dist.get_rank(group) + 1) * n])


def flat_units(
    root: nn.Module, modules: Mapping[str, nn.Module], param: str = "weight"
) -> list[tuple[FlatUnit, dict[int, str]]]:
    """The FSDP1 units holding ``modules[name].<param>``: ``(unit, {view index: name})``, in model order.

    Empty when ``root`` contains no FSDP1 module. Raises ``ValueError`` naming targets found in no unit.
    """
    by_id = {id(m): n for n, m in modules.items()}
    out: list[tuple[FlatUnit, dict[int, str]]] = []
    seen: set[str] = set()
    for handle in fsdp1_handles(root):
        unit = FlatUnit(handle)
        members = {i: by_id[id(m)] for i, (m, p) in enumerate(unit.members) if p == param and id(m) in by_id}
        if members:
            out.append((unit, members))
            seen.update(members.values())
    if out and len(seen) != len(modules):
        missing = sorted(set(modules) - seen)
        raise ValueError(f"FORA (FSDP1): target weights {missing[:5]} are in no FSDP flat parameter")
    return out
