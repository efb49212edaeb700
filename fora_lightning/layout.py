"""How the target weights are held, and FORA's per-step work on them, under every Lightning strategy.

- whole ``d_out x d_in`` tensors (one process, DDP); a GPT-2 ``Conv1D`` stores ``W^T``, read through
  :func:`~fora_lightning.core.targets.weight_matrix` (its ``d_out x d_in`` view) everywhere below;
- FSDP2 row shards (DTensor ``Shard(0)``): ``G Q`` on the local rows, ``U^T G`` summed over the shard group;
- FSDP1 flat parameters (:mod:`fora_lightning.fsdp1`): one FSDP unit gathered at a time, its 2-D views projected,
  the local shard written back.

Under FSDP (1 and 2) FORA's own state is split too: :meth:`TargetLayout.shard` keeps each rank's rows of every
basis, ``U`` and ``V`` (:class:`~fora_lightning.core.sharding.Split`), gathered one input at a time where a
projection needs them (:class:`_Gathered`). The post-step projection without anchors (``reprojection='step'``) is
:meth:`TargetLayout.step_units`: one :class:`~fora_lightning.layerwise_step.Unit` per layer (per FSDP1 unit) for
:class:`~fora_lightning.layerwise_step.LayerwiseStep`.

The math is :mod:`fora_lightning.core.projection`; this module only chooses which rows it sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fora_lightning._compat import flat_param_local, flat_param_sizes, flat_param_views
from fora_lightning.core.distributed import RowShard, local_tensor, row_shard
from fora_lightning.core.precision import project_cheap, project_weight_mixed_
from fora_lightning.core.projection import leak_part_, project, project_step_, project_weight_
from fora_lightning.core.sharding import Split
from fora_lightning.core.subspace import LayerSubspace, to_host
from fora_lightning.core.targets import dense_weight, features, is_quantized, is_transposed, weight_matrix
from fora_lightning.fsdp1 import FlatUnit, flat_units
from fora_lightning.layerwise_step import Unit

Subspaces = Mapping[str, LayerSubspace]


class TargetLayout:
    """The target linears of one fit, bound to the strategy's wrapped model (``trainer.strategy.model``)."""

    def __init__(self, targets: Mapping[str, nn.Module], wrapped_model: nn.Module) -> None:
        self.targets = dict(targets)
        self.flat: list[tuple[FlatUnit, dict[int, str]]] = flat_units(wrapped_model, self.targets)
        self.shards: dict[str, RowShard] = (
            {} if self.flat else {n: s for n, m in self.targets.items() if (s := row_shard(m.weight)) is not None}
        )
        transposed = [n for n in self.shards if is_transposed(self.targets[n])]
        if transposed:
            raise ValueError(
                f"FORA: target(s) {transposed[:3]} are Conv1D layers (weight stored d_in x d_out) sharded by FSDP2 along "
                "d_in, which the row-sharded projection does not handle: use DDP or FSDP1 for GPT-2-family models"
            )

    def split_for(self, name: str) -> Split | None:
        """How ``name``'s FORA state is split over ranks: FSDP2 over its weight's one shard group, FSDP1 over its
        unit's process group; ``None`` (whole on every rank) on one device, under DDP and on 2-D meshes."""
        shard = self.shards.get(name)
        if shard is not None:
            if len(shard.groups) != 1:
                return None
            group = shard.groups[0]
            return Split(dist.get_rank(group), dist.get_world_size(group), group)
        for unit, members in self.flat:
            if name in members.values() and unit.handle.uses_sharded_strategy:
                group = unit.handle.process_group
                return Split(dist.get_rank(group), dist.get_world_size(group), group)
        return None

    def shard(self, subspaces: Subspaces) -> None:
        """Keep only this rank's rows of each layer's ``basis``, ``u``, ``v`` wherever the weights are sharded."""
        cache: dict[int, tuple[Tensor, Tensor]] = {}
        for name, sub in subspaces.items():
            split = self.split_for(name)
            if split is not None and split.world > 1:
                sub.shard(split, cache)

    def gradient_projector(self, precision: str = "float32") -> Callable[[Subspaces], None]:
        """``grad <- Pi(grad)`` for every target weight that has a gradient, as one callable chosen once per fit: the
        layout (FSDP1 units, else whole weights or FSDP2 rows) and the GEMM arithmetic (``precision``; FSDP1: float32)."""
        if self.flat:
            return self._project_unit_grads
        fn = project if precision == "float32" else partial(project_cheap, precision=precision)
        return partial(self._project_row_grads, fn)

    def project_grads(self, subspaces: Subspaces, precision: str = "float32") -> None:
        """:meth:`gradient_projector` resolved and called once (benchmarks and tests)."""
        self.gradient_projector(precision)(subspaces)

    def _project_unit_grads(self, subspaces: Subspaces) -> None:
        full = _Gathered()
        for unit, members in self.flat:
            with unit.gathered("grad", writeback=True) as views:
                for i, name in members.items():
                    sub = subspaces[name]
                    basis, u, v = full.basis(sub), sub.full("u"), sub.full("v")  # collectives: every rank
                    if views is not None:
                        g = weight_matrix(self.targets[name], views[i])
                        g.copy_(project(g, basis, u, v, complement=sub.complement))

    def _project_row_grads(self, fn: Callable[..., Tensor], subspaces: Subspaces) -> None:
        full = _Gathered()
        for name, module in self.targets.items():
            sub = subspaces[name]
            if module.weight.grad is None and sub.split is None:
                continue
            basis, v = full.basis(sub), sub.full("v")  # a split basis is gathered on every rank, grad or not
            if module.weight.grad is None:
                continue
            grad = weight_matrix(module, local_tensor(module.weight.grad))
            u, reduce = self._rows_of_u(name, sub)
            grad.copy_(fn(grad, basis, u, v, complement=sub.complement, all_reduce=reduce))

    def step_units(
        self, subspaces: Subspaces, channel_bound: float | None = None
    ) -> tuple[list[Unit], Callable[[], None]]:
        """The :class:`~fora_lightning.layerwise_step.Unit` of every target weight (FSDP1: of every flat unit holding
        targets), in model order: each copies its weight before its step and projects the step after it
        (:func:`~fora_lightning.core.projection.project_step_`), so ``W - W0`` stays in S without anchors. Also the
        function to call when a step is done (it drops the last gathered basis)."""
        full = _Gathered()
        if self.flat:
            units: list[Unit] = [
                _FlatStep(unit, members, self.targets, subspaces, full, channel_bound) for unit, members in self.flat
            ]
        else:
            units = [_LayerStep(self, name, subspaces, full, channel_bound) for name in self.targets]
        return units, full.clear

    def reprojector(
        self, precision: str = "float32", split: bool = False, channel_bound: float | None = None
    ) -> Callable[[Subspaces], None]:
        """``W <- W0 + Pi(W - W0)`` from the anchors (``reprojection='anchors'``), for every target whose anchors are
        set, as one callable chosen once per fit: the layout and the arithmetic
        (:func:`~fora_lightning.core.precision.project_weight_mixed_` unless ``precision="float32"``; FSDP1: float32);
        with ``channel_bound = tau`` the channel is clamped to ``|delta_i| <= tau S_i`` in the same pass."""
        if self.flat:
            return partial(self._reproject_units, channel_bound)
        fn = (
            project_weight_
            if precision == "float32"
            else partial(project_weight_mixed_, precision=precision, split=split)
        )
        return partial(self._reproject_rows, fn, channel_bound)

    def reproject(
        self, subspaces: Subspaces, precision: str = "float32", split: bool = False, channel_bound: float | None = None
    ) -> None:
        """:meth:`reprojector` resolved and called once (benchmarks and tests)."""
        self.reprojector(precision, split, channel_bound)(subspaces)

    @torch.no_grad()
    def _reproject_units(self, channel_bound: float | None, subspaces: Subspaces) -> None:
        for unit, members in self.flat:
            with unit.gathered("data", writeback=True) as views:
                for i, name in members.items():
                    sub = subspaces.get(name)
                    if sub is not None and sub.anchor_q is not None:
                        w = weight_matrix(self.targets[name], views[i])
                        q, anchor_q = _on(w.device, sub.reprojection_basis, sub.anchor_q)
                        project_weight_(
                            w, q, anchor_q, sub.u, sub.v, sub.anchor_u, s=sub.s, channel_bound=channel_bound
                        )

    @torch.no_grad()
    def _reproject_rows(self, fn: Callable[..., Tensor], channel_bound: float | None, subspaces: Subspaces) -> None:
        for name, module in self.targets.items():
            sub = subspaces.get(name)
            if sub is None or sub.anchor_q is None:
                continue
            u, reduce = self._rows_of_u(name, sub)
            w = weight_matrix(module, local_tensor(module.weight.data))
            q, anchor_q = _on(w.device, sub.reprojection_basis, sub.anchor_q)  # host-resident anchors: copied per layer
            fn(w, q, anchor_q, u, sub.v, sub.anchor_u, all_reduce=reduce, s=sub.s, channel_bound=channel_bound)

    def attach_anchors(self, subspaces: Subspaces, on_host: bool = False) -> None:
        """``A0 = W0 Q`` (this rank's rows under FSDP2) and ``B0 = U^T W0`` (rows summed over shards), float32;
        ``on_host``: ``A0`` (and Q for a complement basis) in host memory (``LayerSubspace.attach_anchors``)."""
        kw = {"on_host": on_host, "shared": {}}  # layers sharing a complement basis share its Q
        if self.flat:
            for unit, members in self.flat:
                with unit.gathered("data") as views:
                    for i, name in members.items():
                        subspaces[name].attach_anchors(weight_matrix(self.targets[name], views[i]), **kw)
            return
        for name, sub in subspaces.items():
            shard = self.shards.get(name)
            if shard is None:
                sub.attach_anchors(weight_matrix(self.targets[name]), **kw)
                continue
            sub.attach_anchors(local_tensor(self.targets[name].weight), shard.rows(sub.u), shard.all_reduce, **kw)

    def localize_anchors(self, subspaces: Subspaces) -> None:
        """After a restore: keep this rank's rows of the (full) checkpointed ``anchor_q`` under FSDP2 (host-resident
        anchors stay in pinned host memory)."""
        for name, shard in self.shards.items():
            sub = subspaces[name]
            if sub.anchor_q is not None and sub.anchor_q.shape[0] == sub.d_out:
                rows = shard.rows(sub.anchor_q).contiguous()
                sub.anchor_q = to_host(rows) if sub.anchors_on_host else rows

    def full(self, name: str, field: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` full-size: the row-sharded ``anchor_q`` gathered over its shard group (a collective)."""
        shard = self.shards.get(name)
        if field != "anchor_q" or shard is None:
            return t
        return shard.gather(
            t.to(self.targets[name].weight.device)
        )  # host-resident anchors: NCCL gathers device tensors

    def shape_targets(self) -> Mapping[str, nn.Module]:
        """Targets for shape checks (``d_out x d_in`` weights): a meta stand-in of each true shape under FSDP1 (a weight
        is a flat shard), for a ``Conv1D`` (stored transposed) or a bitsandbytes base (a packed weight)."""
        if not self.flat and not any(is_transposed(m) or is_quantized(m) for m in self.targets.values()):
            return self.targets
        return {
            n: nn.Linear(features(m)[1], features(m)[0], bias=False, device="meta") for n, m in self.targets.items()
        }

    def full_weights(self) -> Mapping[str, torch.Tensor]:
        """Target name -> full ``d_out x d_in`` weight, gathered on demand (one FSDP1 unit at a time)."""
        return _FullWeights(self)

    def _rows_of_u(
        self, name: str, sub: LayerSubspace
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """``U``'s rows matching this rank's weight rows (FSDP2: a split ``U`` already holds exactly them), and the
        all-reduce that sums ``U^T X`` over the shard group."""
        shard = self.shards.get(name)
        if shard is None:
            return sub.u, None
        return (sub.u if sub.split is not None else shard.rows(sub.u)), shard.all_reduce


class _Gathered:
    """The full basis of the input being projected: gathered once for the consecutive layers that share it
    (q/k/v, gate/up) and dropped when the next input's comes (one input's basis at a time)."""

    def __init__(self) -> None:
        self._key: int | None = None
        self._full: Tensor | None = None

    def basis(self, sub: LayerSubspace) -> Tensor:
        if sub.split is None:
            return sub.basis
        if self._key != id(sub.basis):
            self._key, self._full = None, None  # free the previous input's basis first
            self._full, self._key = sub.full("basis"), id(sub.basis)
        return self._full

    def clear(self) -> None:
        self._key, self._full = None, None


class _LayerStep:
    """One target weight (whole, or its FSDP2 rows) as a :class:`~fora_lightning.layerwise_step.Unit`."""

    def __init__(
        self, layout: TargetLayout, name: str, subspaces: Subspaces, full: _Gathered, channel_bound: float | None
    ) -> None:
        self.layout, self.name, self.subspaces, self.full, self.channel_bound = (
            layout,
            name,
            subspaces,
            full,
            channel_bound,
        )
        self.module = layout.targets[name]
        self.params = [self.module.weight]

    def _weight(self) -> Tensor:
        return weight_matrix(self.module, local_tensor(self.module.weight.data))

    def before(self) -> Tensor:
        return self._weight().clone()

    @torch.no_grad()
    def after(self, before: Tensor) -> None:
        sub = self.subspaces[self.name]
        basis, v = self.full.basis(sub), sub.full("v")
        u, reduce = self.layout._rows_of_u(self.name, sub)
        project_step_(
            self._weight(),
            before,
            basis,
            u,
            v,
            complement=sub.complement,
            all_reduce=reduce,
            s=sub.s,
            delta=sub.delta,
            channel_bound=self.channel_bound,
        )


class _FlatStep:
    """One FSDP1 flat unit as a :class:`~fora_lightning.layerwise_step.Unit`: its local shard copied before the step;
    after it the step is all-gathered, each target's view replaced by its leak (``step - Pi(step)``, everything else
    zeroed), and this rank's slice of the leak subtracted from the shard."""

    def __init__(
        self,
        unit: FlatUnit,
        members: dict[int, str],
        targets: Mapping[str, nn.Module],
        subspaces: Subspaces,
        full: _Gathered,
        channel_bound: float | None,
    ) -> None:
        self.unit, self.members, self.targets, self.subspaces, self.full = unit, members, targets, subspaces, full
        self.channel_bound = channel_bound
        own = [getattr(m, p) for m, p in unit.members]
        self.params = [unit.flat, *own]

    def before(self) -> Tensor:
        return flat_param_local(self.unit.handle).detach().clone()

    @torch.no_grad()
    def after(self, before: Tensor) -> None:
        handle = self.unit.handle
        local = flat_param_local(handle)
        step = torch.sub(local, before, out=before)
        if handle.uses_sharded_strategy:
            padded, unpadded = flat_param_sizes(handle)
            whole = step.new_empty(padded)
            dist.all_gather_into_tensor(whole, step.contiguous(), group=handle.process_group)
        else:  # NO_SHARD (one process): the local buffer is the whole, unpadded one
            whole, unpadded = step, step.numel()
        leak = torch.zeros_like(whole)
        views, leaks = flat_param_views(handle, whole[:unpadded]), flat_param_views(handle, leak[:unpadded])
        for i, name in self.members.items():
            sub = self.subspaces[name]
            basis, u, v = self.full.basis(sub), sub.full("u"), sub.full("v")
            out = weight_matrix(self.targets[name], leaks[i])
            out.copy_(weight_matrix(self.targets[name], views[i]))
            leak_part_(
                out, basis, u, v, complement=sub.complement, s=sub.s, delta=sub.delta, channel_bound=self.channel_bound
            )
        if handle.uses_sharded_strategy:
            n = local.numel()
            rank = dist.get_rank(handle.process_group)
            local.sub_(leak[rank * n : (rank + 1) * n])
        else:
            local.sub_(leak)
        self.full.clear()


def _on(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on ``device`` (no copy when already there; asynchronous from pinned host memory)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


class _FullWeights(Mapping[str, torch.Tensor]):
    """Full weights of a :class:`TargetLayout`: FSDP2 ``full_tensor()``, FSDP1 one unit at a time.

    :meth:`items` gathers each FSDP1 unit once; every gather is a collective, run in the same order on all ranks.
    """

    def __init__(self, layout: TargetLayout) -> None:
        self.layout = layout

    def __len__(self) -> int:
        return len(self.layout.targets)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.targets)

    def __getitem__(self, name: str) -> torch.Tensor:
        for n, w in self._unit_items(lambda members: name in members.values()):
            if n == name:
                return w
        module = self.layout.targets[name]
        if name in self.layout.shards:
            return weight_matrix(module, module.weight.detach().full_tensor())
        return dense_weight(module)  # a bitsandbytes base dequantized

    def items(self):  # type: ignore[override]
        if self.layout.flat:
            return self._unit_items(lambda members: True)
        return ((n, self[n]) for n in self.layout.targets)

    def _unit_items(self, wanted: Callable[[dict[int, str]], bool]) -> Iterator[tuple[str, torch.Tensor]]:
        for unit, members in self.layout.flat:
            if wanted(members):
                with unit.gathered("data") as views:
                    targets = self.layout.targets
                    yield from (
                        (name, weight_matrix(targets[name], views[i]).detach().clone()) for i, name in members.items()
                    )
