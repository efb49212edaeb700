r"""The leakage probe: FORA's protection measured during training on a few held-out inputs of the kept capability.

Before the first step (the weights are still ``W0``) one held-out batch of the kept capability runs through the
model; each target keeps at most ``rows`` of its non-padding input tokens ``X`` (``n x d_in``, float32; layers
that read one input share the tensor), ``Y0 = X W0^T`` (this rank's rows of ``W0`` under FSDP2) and
``c0 = diag(U_r^T W0 V_r)``. Later, without any forward pass:

.. math::

    \mathrm{leak} = \frac{\| X W^T - Y_0 - (X V_r)\,\mathrm{diag}(c - c_0)\,U_r^T \|_F}{\| Y_0 \|_F},
    \qquad c = \mathrm{diag}(U_r^T W V_r),

which is :func:`fora_lightning.core.projection.relative_leakage` (``||(W - W0) X|| / ||W0 X||``) with ``W0 X``
stored instead of ``W0``, and with the spectral channel (the ``r`` singular values FORA lets move on purpose)
taken out, as the training-mode tests measure it. For a FORA-LoRA layer ``X (W - W0)^T`` is the branch's
output minus its channel ``U_r diag(delta) V_r^T``. Under FSDP2 each rank works on its rows; the squared norms
(and ``c``) are summed over the shard group, so every rank gets the full-layer value.
Cost per layer: one ``n x d_in x d_out`` matmul (``n <= rows``) and ``n (d_in + d_out)`` floats kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fora_lightning.core.covariance import attention_mask_of, eval_mode
from fora_lightning.core.distributed import RowShard, local_tensor, row_shard
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.targets import dense_weight, weight_matrix


def is_lora(m: nn.Module) -> bool:
    """A :class:`~fora_lightning.lora.layer.ForaLoraLinear` (duck-typed: ``lora`` imports the Callbacks, which import this)."""
    return hasattr(m, "base_layer") and hasattr(m, "lora_delta")


@dataclass
class _Held:
    """One layer's probe inputs: ``x`` (``n x d_in``), ``y0 = x W0_local^T``, ``c0`` and its row shard."""

    x: Tensor
    y0: Tensor
    c0: Tensor | None
    shard: RowShard | None


def _select_rows(x: Tensor, mask: Tensor | None, rows: int) -> Tensor:
    """At most ``rows`` non-padding tokens of ``x`` (``... x d``), evenly spaced, as float32 ``n x d``."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == flat.shape[0]:
        flat = flat[mask.reshape(-1).to(flat.device) != 0]
    if flat.shape[0] > rows:
        flat = flat[torch.linspace(0, flat.shape[0] - 1, rows, device=flat.device).round().long()]
    return flat.float().clone()


def _u_rows(sub: LayerSubspace, shard: RowShard | None) -> Tensor | None:
    if sub.u is None or sub.u.shape[-1] == 0:
        return None
    return shard.rows(sub.u) if shard is not None else sub.u


class ProtectionProbe:
    """Per-layer leakage of the current weights on stored held-out inputs (see the module docstring).

    ``modules``: name -> the target ``nn.Linear`` (FORA) or :class:`~fora_lightning.lora.layer.ForaLoraLinear`.
    """

    def __init__(self, modules: Mapping[str, nn.Module], subspaces: Mapping[str, LayerSubspace]) -> None:
        self.modules = dict(modules)
        self.subspaces = subspaces
        self.held: dict[str, _Held] = {}

    @torch.no_grad()
    def capture(self, model: nn.Module, batches: Iterable[Any], forward: Any, rows: int = 64) -> None:
        """Run the first batch of ``batches`` through ``forward`` (eval, no grad) and keep each layer's inputs."""
        inputs: dict[str, Tensor] = {}
        shared: dict[int, Tensor] = {}
        mask: list[Tensor | None] = [None]

        def hook_for(name: str):
            def hook(_: nn.Module, args: tuple) -> None:
                x = args[0]
                if id(x) not in shared:  # the input is kept with its rows, so its id cannot be reused by another
                    shared[id(x)] = (x, _select_rows(x, mask[0], rows))
                inputs[name] = shared[id(x)][1]

            return hook

        hooked = {n: (m.base_layer if is_lora(m) else m) for n, m in self.modules.items()}
        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in hooked.items()]
        try:
            with eval_mode(model):
                for batch in batches:
                    mask[0] = attention_mask_of(batch)
                    forward(batch)
                    break
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.modules if n not in inputs]
        if missing:
            raise ValueError(f"FORA probe: the held-out batch never reached layers {missing[:5]}; is the loader empty?")
        for name, x in inputs.items():
            w0 = self._base_weight(name)
            shard = row_shard(w0)
            w = local_tensor(w0.detach()).float()
            x = x.to(w.device)
            sub = self.subspaces[name]
            u = _u_rows(sub, shard)
            c0 = self._channel(w, u, sub.v, shard) if u is not None else None
            self.held[name] = _Held(x=x, y0=x @ w.T, c0=c0, shard=shard)

    def _base_weight(self, name: str) -> Tensor:
        """The base weight as ``d_out x d_in`` (a transformers ``Conv1D`` stores its transpose; bitsandbytes: dequantized)."""
        m = self.modules[name]
        return dense_weight(m.base_layer if is_lora(m) else m)

    @staticmethod
    def _channel(w: Tensor, u: Tensor, v: Tensor, shard: RowShard | None) -> Tensor:
        """``diag(U_r^T W V_r)`` (summed over the row shards)."""
        c = ((u.T.to(w) @ w) * v.T.to(w)).sum(1)
        return shard.all_reduce(c) if shard is not None else c

    @torch.no_grad()
    def squared_norms(self) -> dict[str, tuple[float, float]]:
        """Layer -> ``(||leaking part||^2, ||Y0||^2)``, summed over row shards (a collective under FSDP2)."""
        out = {}
        for name, h in self.held.items():
            sub, m = self.subspaces[name], self.modules[name]
            u = _u_rows(sub, h.shard)
            if is_lora(m):  # X (W - W0)^T = the branch's output; its channel is U diag(delta) V^T
                diff = m.update(h.x.to(m.lora_A.dtype)).float()
                delta = m.lora_delta.detach().float() if u is not None else None
            else:
                w = local_tensor(weight_matrix(m).detach()).float()
                diff = h.x @ w.T - h.y0
                delta = self._channel(w, u, sub.v, h.shard) - h.c0 if u is not None else None
            if delta is not None:
                diff = diff - ((h.x @ sub.v.to(h.x)) * delta) @ u.T.to(h.x)
            sq = torch.stack([diff.double().square().sum(), h.y0.double().square().sum()])
            if h.shard is not None:
                h.shard.all_reduce(sq)
            out[name] = (float(sq[0]), float(sq[1]))
        return out

    def leakage(self) -> dict[str, float]:
        """Layer -> ``||leaking part|| / ||W0 X||`` on the stored inputs."""
        return {n: (a / max(b, 1e-300)) ** 0.5 for n, (a, b) in self.squared_norms().items()}

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Layer -> ``x``, full ``y0`` (its columns gathered under FSDP2: a collective), ``c0``; on the CPU."""
        out = {}
        for name, h in self.held.items():
            y0 = h.shard.gather(h.y0.T.contiguous()).T if h.shard is not None else h.y0
            out[name] = {"x": h.x.cpu(), "y0": y0.cpu()} | ({"c0": h.c0.cpu()} if h.c0 is not None else {})
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Restore :meth:`state_dict` onto the targets' devices, keeping this rank's columns of ``y0``."""
        for name, entry in state.items():
            w = self._base_weight(name)
            shard, dev = row_shard(w), w.device
            y0 = entry["y0"].to(dev)
            self.held[name] = _Held(
                x=entry["x"].to(dev),
                y0=shard.rows(y0.T).T.contiguous() if shard is not None else y0,
                c0=entry["c0"].to(dev) if "c0" in entry else None,
                shard=shard,
            )
