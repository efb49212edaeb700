r"""The leakage probe: each protected layer's *output* on a few stored rows, against its output at fit start.

Before the first step (the weights are still ``W0``) one batch of the probe source runs through the model (ended
once every target has read its input, where the strategy allows it); each target keeps at most ``rows`` of its
non-padding input tokens ``X`` (``n x d_in``, float32; layers that read one input share the tensor) and their
part in span(Q), ``X_Q = X - X P_Q`` (shared by layers with one basis). The layer's own forward (eval mode,
autocast off, float32 matmuls at full precision) then gives the base outputs ``f0(X)``, ``f0(X_Q)`` and
``f0(0)`` (its bias), kept beside them (for a FORA-LoRA layer its ``base_layer``'s: ``W0`` itself, even when the layer
holds a trained ``B`` and ``delta``, which the bound on ``delta`` is relative to). A reading runs the module found under the layer's name *now* on the
same rows, in one call of ``2n + 1`` rows, so anything that moves what the kept capability reads is seen: an
optimizer step, clipping, a hand-written update, a trained bias, a rebuilt or re-wrapped layer, weights loaded
later. :mod:`fora_lightning.core.leakage` turns the outputs into the readings and their certified bounds.

Under FSDP2 (row-sharded ``DTensor`` weights) a bare Linear cannot run outside its unit's forward, so each rank
computes its output columns ``X W_local^T + b_local`` and the squared norms (and the channel fit's ``n x r``
coordinates) are summed over the shard group: every rank gets the full-layer value. FSDP1 (flat parameters) and
FORA-LoRA under FSDP2 have no probe (:mod:`fora_lightning.monitor` says so).

Memory (float32): ``n d_in`` per distinct input, ``n d_in`` per distinct (input, basis), and ``(2 n + 1) d_out`` per
layer (this rank's columns under FSDP2); :meth:`ProtectionProbe.nbytes`. On CUDA it is parked in pinned host memory
and each reading copies one layer's part to the device at a time (the device holds one layer's worth); elsewhere it
stays on the layer's device. Cost of a reading: one forward of ``2n + 1`` rows per layer,
``2 (2n + 1) d_in d_out`` flops, plus ``O(n (d_in + d_out) r)``, and on CUDA the host-to-device copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from fora_lightning.core.covariance import attention_mask_of, eval_mode
from fora_lightning.core.distributed import RowShard, local_tensor, row_shard
from fora_lightning.core.early_stop import StopForward
from fora_lightning.core.leakage import channel_residual, numerical_tolerance, span_part
from fora_lightning.core.subspace import LayerSubspace, to_host
from fora_lightning.core.targets import weight_matrix


def is_lora(m: nn.Module) -> bool:
    """A :class:`~fora_lightning.lora.layer.ForaLoraLinear` (duck-typed: ``lora`` imports the Callbacks, which import this)."""
    return hasattr(m, "base_layer") and hasattr(m, "lora_delta")


def base_weight(m: nn.Module) -> Tensor:
    """The parameter holding ``W0`` (a FORA-LoRA layer's ``base_layer.weight``), as stored."""
    return m.base_layer.weight if is_lora(m) else m.weight


@dataclass
class Held:
    """One layer's probe: rows ``x`` and their span(Q) part ``xq`` (``None`` when k = 0), base outputs ``y0 = f0(x)``,
    ``yq0 = f0(xq)``, ``z0 = f0(0)`` (float32; this rank's output columns under FSDP2), the dtype the layer computes
    in and its row shard."""

    x: Tensor
    xq: Tensor | None
    y0: Tensor
    yq0: Tensor | None
    z0: Tensor
    dtype: torch.dtype
    shard: RowShard | None
    device: torch.device

    def on_device(self) -> Held:
        """This probe with its tensors on the layer's device (copies when they are parked in host memory)."""
        if self.x.device == self.device:
            return self
        move = {f: getattr(self, f) for f in ("x", "xq", "y0", "yq0", "z0")}
        return replace(
            self, **{f: t.to(self.device, non_blocking=True) if t is not None else None for f, t in move.items()}
        )


@dataclass
class Reading:
    """One layer's reading, each relative to the matching base output norm (``core.leakage``).

    ``leakage``: on ``X_Q``, spectral channel removed; ``span``: on ``X_Q``, all of it; ``heldout``: on the raw rows;
    ``bias``: ``||f(0) - f0(0)|| / ||f0(X_Q)||`` (or ``/ ||f0(X)||`` when k = 0). ``None`` where k = 0.
    """

    leakage: float | None
    span: float | None
    heldout: float
    bias: float


@dataclass
class Norms:
    """Base output norms of one layer (full layer, summed over shards): ``||f0(X)||``, ``||f0(X_Q)||``,
    ``||X_Q W0^T|| = ||f0(X_Q) - f0(0)||`` and ``||X_perp W0^T|| = ||f0(X) - f0(X_Q)||``."""

    raw: float
    span: float
    span_bias_free: float
    outside: float


@contextlib.contextmanager
def exact_matmul(device: torch.device) -> Iterator[None]:
    """Within: autocast off and float32 matmuls at full precision (no TF32), whatever the run set; restored on exit."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _select_rows(x: Tensor, mask: Tensor | None, rows: int) -> Tensor:
    """At most ``rows`` non-padding tokens of ``x`` (``... x d``), evenly spaced, as float32 ``n x d``."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == flat.shape[0]:
        flat = flat[mask.reshape(-1).to(flat.device) != 0]
    if flat.shape[0] > rows:
        flat = flat[torch.linspace(0, flat.shape[0] - 1, rows, device=flat.device).round().long()]
    return flat.float().clone()


def _u_rows(sub: LayerSubspace, shard: RowShard | None) -> Tensor | None:
    """``U``'s rows of this rank's weight rows (a split ``U`` under FSDP2 already holds exactly those)."""
    if sub.u is None or sub.u.shape[-1] == 0:
        return None
    return shard.rows(sub.u) if shard is not None and sub.split is None else sub.u


def _sq(t: Tensor) -> Tensor:
    return t.double().square().sum()


class ProtectionProbe:
    """Per-layer readings of the current outputs on stored rows (see the module docstring).

    ``model``: the LightningModule; ``modules``: name (in ``model``) -> the target ``nn.Linear`` (FORA) or
    :class:`~fora_lightning.lora.layer.ForaLoraLinear` at fit start; ``subspaces``: their bases.
    """

    def __init__(
        self, model: nn.Module, modules: Mapping[str, nn.Module], subspaces: Mapping[str, LayerSubspace]
    ) -> None:
        self.model = model
        self.modules = dict(modules)
        self.subspaces = subspaces
        self.held: dict[str, Held] = {}
        self.norms: dict[str, Norms] = {}
        self._params = {n: base_weight(m) for n, m in self.modules.items()}

    # ------------------------------------------------------------------ capture (fit start)
    @torch.no_grad()
    def capture(
        self, model: nn.Module, batches: Iterable[Any], forward: Any, rows: int = 64, stop_early: bool = False
    ) -> None:
        """Run the first batch of ``batches`` through ``forward`` (eval, no grad) and keep each layer's rows and base
        outputs. ``stop_early``: end the forward once every target has read its input (the strategy allows it)."""
        inputs: dict[str, Tensor] = {}
        shared: dict[int, tuple[Tensor, Tensor]] = {}
        mask: list[Tensor | None] = [None]

        def hook_for(name: str):
            def hook(_: nn.Module, args: tuple) -> None:
                x = args[0]
                if id(x) not in shared:  # the input is kept with its rows, so its id cannot be reused by another
                    shared[id(x)] = (x, _select_rows(x, mask[0], rows))
                inputs.setdefault(name, shared[id(x)][1])
                if stop_early and len(inputs) == len(self.modules):
                    raise StopForward

            return hook

        hooked = {n: (m.base_layer if is_lora(m) else m) for n, m in self.modules.items()}
        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in hooked.items()]
        try:
            with eval_mode(model):
                for batch in batches:
                    mask[0] = attention_mask_of(batch)
                    with contextlib.suppress(StopForward):
                        forward(batch)
                    break
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.modules if n not in inputs]
        if missing:
            raise ValueError(
                f"FORA probe: the probe batch never reached layers {missing[:5]}; is the probe loader empty?"
            )
        spans: dict[tuple[int, int], Tensor] = {}
        for name, x in inputs.items():
            sub, m = self.subspaces[name], self.modules[name]
            w = base_weight(m)
            x = x.to(w.device)
            xq = None
            if sub.k > 0:
                key = (id(x), id(sub.basis))
                if key not in spans:  # outside the training forward's autocast: X_Q must lie in span(Q) to float32
                    basis = sub.full("basis")  # a split basis is gathered whole (every rank, in order), then dropped
                    with exact_matmul(x.device):
                        spans[key] = span_part(x, basis.to(x.device), sub.complement)
                xq = spans[key]
            shard = row_shard(w)
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            base = m.base_layer if is_lora(m) else m  # a FORA-LoRA layer's reference is W0 itself, whatever B and delta
            y0, yq0, z0 = self._outputs(base, x, xq, dtype, shard)
            self.held[name] = Held(x=x, xq=xq, y0=y0, yq0=yq0, z0=z0, dtype=dtype, shard=shard, device=w.device)
        self._norms()
        self._park()

    def _park(self) -> None:
        """On CUDA, move the probe to pinned host memory (shared rows stay shared); each reading copies one layer's back."""
        parked: dict[int, Tensor] = {}

        def host(t: Tensor | None) -> Tensor | None:
            if t is None or t.device.type != "cuda":
                return t
            return parked.setdefault(id(t), to_host(t))

        for name, h in self.held.items():
            self.held[name] = replace(h, x=host(h.x), xq=host(h.xq), y0=host(h.y0), yq0=host(h.yq0), z0=host(h.z0))

    def _outputs(
        self, m: nn.Module, x: Tensor, xq: Tensor | None, dtype: torch.dtype, shard: RowShard | None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``f(x)``, ``f(xq)``, ``f(0)`` in float32, through the module in one call (FSDP2: this rank's columns)."""
        rows = [x] + ([xq] if xq is not None else []) + [x.new_zeros(1, x.shape[1])]
        stacked = torch.cat(rows).to(dtype)
        with exact_matmul(x.device), torch.no_grad():
            if shard is not None:
                w = local_tensor(weight_matrix(m).detach())
                out = stacked.to(w.dtype) @ w.T
                if getattr(m, "bias", None) is not None:
                    out = out + local_tensor(m.bias.detach())
            else:
                with eval_mode(m):
                    out = m(stacked)
        out = out.float()
        n = x.shape[0]
        return out[:n], (out[n : 2 * n] if xq is not None else None), out[-1]

    def _norms(self) -> None:
        """:class:`Norms` of every layer (summed over row shards: a collective under FSDP2)."""
        for name, held in self.held.items():
            h = held.on_device()
            yq0 = h.yq0 if h.yq0 is not None else h.z0.expand_as(h.y0)  # k = 0: X_Q = 0, f0(0) = z0
            sq = torch.stack([_sq(h.y0), _sq(yq0), _sq(yq0 - h.z0), _sq(h.y0 - yq0)])
            if h.shard is not None:
                h.shard.all_reduce(sq)
            self.norms[name] = Norms(*(float(v) ** 0.5 for v in sq))

    # ------------------------------------------------------------------ readings
    def current(self, name: str) -> nn.Module | None:
        """The module under ``name`` in the model now (``None`` if there is none)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def rebuilt(self, name: str) -> bool:
        """Whether the layer under ``name`` (or its weight parameter) is another object than at fit start."""
        m = self.current(name)
        return m is not self.modules[name] or base_weight(m) is not self._params[name]

    @torch.no_grad()
    def read(self) -> dict[str, Reading]:
        """Layer -> :class:`Reading` of the module found under its name now (a collective per layer under FSDP2).

        A layer that is gone, or whose new module rejects the rows, reads ``inf`` everywhere."""
        out = {}
        for name, held in self.held.items():
            h, m = held.on_device(), self.current(name)
            try:
                y, yq, z = self._outputs(m, h.x, h.xq, h.dtype, h.shard)
                if y.shape != h.y0.shape:
                    raise ValueError("output shape changed")
            except Exception:  # noqa: BLE001 - a removed or incompatible layer: reported as a violation by the monitor
                inf = float("inf")
                out[name] = Reading(inf if h.xq is not None else None, inf if h.xq is not None else None, inf, inf)
                continue
            sub = self.subspaces[name]
            reduce = h.shard.all_reduce if h.shard is not None else None
            parts = [_sq(y - h.y0), _sq(z - h.z0)]
            if yq is not None:
                diff = yq - h.yq0
                u = _u_rows(sub, h.shard)
                v = sub.full("v") if u is not None else sub.v  # split: gathered (every rank, in order)
                parts += [_sq(diff), _sq(channel_residual(diff, h.xq, u, v, reduce))]
            sq = torch.stack(parts)
            if h.shard is not None:
                h.shard.all_reduce(sq)
            nm = self.norms[name]
            den = nm.span if yq is not None else nm.raw
            rel = [float(v) ** 0.5 for v in sq]
            out[name] = Reading(
                leakage=rel[3] / max(nm.span, 1e-300) if yq is not None else None,
                span=rel[2] / max(nm.span, 1e-300) if yq is not None else None,
                heldout=rel[0] / max(nm.raw, 1e-300),
                bias=rel[1] / max(den, 1e-300),
            )
        return out

    def leakage(self) -> dict[str, float]:
        """Layer -> its certified reading (channel removed, on ``X_Q``); layers with k = 0 are left out."""
        return {n: r.leakage for n, r in self.read().items() if r.leakage is not None}

    def tolerance(self, name: str) -> float:
        """The numerical slack of ``name``'s readings (:func:`~fora_lightning.core.leakage.numerical_tolerance`)."""
        return numerical_tolerance(self.held[name].dtype)

    def nbytes(self) -> int:
        """Bytes the probe holds (shared rows counted once): on the layers' devices, or in host memory on CUDA."""
        seen: dict[int, int] = {}
        for h in self.held.values():
            for t in (h.x, h.xq, h.y0, h.yq0, h.z0):
                if t is not None:
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Layer -> ``x``, ``xq``, the full base outputs (columns gathered under FSDP2: a collective), dtype; on the CPU."""
        out = {}
        for name, held in self.held.items():
            h = held.on_device()

            def full(t: Tensor, h: Held = h) -> Tensor:
                return (h.shard.gather(t.T.contiguous()).T if h.shard is not None else t).cpu()

            entry: dict[str, Any] = {"x": h.x.cpu(), "y0": full(h.y0), "z0": full(h.z0[None])[0], "dtype": str(h.dtype)}
            if h.xq is not None:
                entry |= {"xq": h.xq.cpu(), "yq0": full(h.yq0)}
            out[name] = entry
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> bool:
        """Restore :meth:`state_dict` onto the targets' devices, keeping this rank's columns; ``False`` (nothing
        restored) for a state without base outputs on span(Q) (written before the sentinel)."""
        if any("z0" not in entry for entry in state.values()):
            return False
        for name, entry in state.items():
            w = base_weight(self.modules[name])
            shard, dev = row_shard(w), w.device

            def local(t: Tensor, shard: RowShard | None = shard, dev: torch.device = dev) -> Tensor:
                t = t.to(dev)
                return shard.rows(t.T).T.contiguous() if shard is not None else t

            self.held[name] = Held(
                x=entry["x"].to(dev),
                xq=entry["xq"].to(dev) if "xq" in entry else None,
                y0=local(entry["y0"]),
                yq0=local(entry["yq0"]) if "yq0" in entry else None,
                z0=local(entry["z0"][None])[0],
                dtype=getattr(torch, str(entry["dtype"]).removeprefix("torch.")),
                shard=shard,
                device=dev,
            )
        self._norms()
        self._park()
        return True
