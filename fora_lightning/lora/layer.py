r"""The FORA-LoRA linear layer: a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a LoRA branch that cannot read span(Q).

.. math::

    y = W_0 x + b + \tfrac{\alpha}{r_{lora}} P_U B A P_Q x + U_r (\delta \odot V_r^T x),
    \qquad P_Q = I - Q Q^T,\ P_U = I - U_r U_r^T.

``B = 0`` and ``delta = 0`` at construction, so the wrapped layer equals the base layer. The
projections are applied to the small factors (``A P_Q = A - (A Q) Q^T``, ``P_U B = B - U_r (U_r^T B)``
with :func:`fora_lightning.core.projection.right_project`), which equals projecting every activation
(``A (P_Q x)``) but costs ``r_lora d_in k`` flops per forward instead of ``tokens x d_in x k`` and keeps
no projected copy of the activations for backward. No ``d x d`` matrix is ever formed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fora_lightning.core.distributed import local_tensor, row_shard
from fora_lightning.core.projection import bound_channel, right_project
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.targets import dense_weight, features, is_quantized, is_target_layer, weight_matrix


class ForaLoraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` or transformers ``Conv1D`` (``base_layer``) with the FORA-LoRA update.

    The base may be a quantized bitsandbytes ``Linear4bit``/``Linear8bitLt`` (QLoRA): ``W0 x + b`` is then its own
    forward, and the bases are built from the dequantized ``W0`` (:func:`~fora_lightning.core.targets.dense_weight`).

    Trainable: ``lora_A`` (``r_lora x d_in``, kaiming-uniform as LoRA), ``lora_B`` (``d_out x r_lora``,
    zeros), ``lora_delta`` (``r``, zeros), in float32 (float64 if the base weight is float64).
    Buffers (in the state dict, same dtype as the LoRA parameters): ``fora_basis`` (Q, ``d_in x k``, or its complement),
    ``fora_u``/``fora_s``/``fora_v`` (top-``r`` singular triplets of ``W0``), ``fora_complement`` and
    ``fora_ready``. ``k`` is only known after calibration: :meth:`set_subspace` fills the bases, and a
    state dict with a different ``k`` loads (the basis buffer is resized).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        weight_rank: int = 8,
        name: str = "",
    ) -> None:
        super().__init__()
        if not is_target_layer(base_layer):
            raise TypeError(
                f"ForaLoraLinear wraps an nn.Linear or a Conv1D; layer '{name}' is a {type(base_layer).__name__}"
            )
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank} (layer '{name}')")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout} (layer '{name}')")
        if weight_rank < 0:
            raise ValueError(f"weight_rank must be >= 0, got {weight_rank} (layer '{name}')")
        self.base_layer = base_layer
        self.name = name
        self.out_features, self.in_features = features(base_layer)
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.scaling = self.lora_alpha / self.lora_rank
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        r = min(weight_rank, self.out_features, self.in_features)
        self.lora_A = nn.Parameter(torch.empty(self.lora_rank, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.lora_rank, device=w.device, dtype=dtype))
        self.lora_delta = nn.Parameter(torch.zeros(r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA (and nn.Linear)
        self.register_buffer("fora_basis", torch.zeros(self.in_features, 0, device=w.device, dtype=dtype))
        self.register_buffer("fora_u", torch.zeros(self.out_features, r, device=w.device, dtype=dtype))
        self.register_buffer("fora_s", torch.zeros(r, device=w.device, dtype=dtype))
        self.register_buffer("fora_v", torch.zeros(self.in_features, r, device=w.device, dtype=dtype))
        self.register_buffer("fora_complement", torch.tensor(False, device=w.device))
        self.register_buffer("fora_ready", torch.tensor(False, device=w.device))
        self._ready = self._complement = False  # mirrors of the flag buffers, read without a device sync

    # ------------------------------------------------------------------ bases
    @property
    def ready(self) -> bool:
        """Whether the bases (Q, U_r, V_r) have been set."""
        return self._ready

    @property
    def weight_rank(self) -> int:
        """r, the number of protected singular triplets (the length of ``lora_delta``)."""
        return self.lora_delta.shape[0]

    @property
    def k(self) -> int:
        """k, the dimension of the protected input span(Q) (0 while unset)."""
        width = self.fora_basis.shape[1]
        return self.in_features - width if self._complement else width

    @property
    def weight(self) -> Tensor:
        """The frozen base weight ``W0`` as ``d_out x d_in`` (a ``Conv1D``'s stored ``W0^T``, transposed; a bitsandbytes
        4-bit/8-bit weight dequantized, a detached copy), for code that reads ``module.weight`` (e.g. its dtype)."""
        return dense_weight(self.base_layer) if is_quantized(self.base_layer) else weight_matrix(self.base_layer)

    @torch.no_grad()
    def set_subspace(self, sub: LayerSubspace) -> None:
        """Fill the bases from a :class:`LayerSubspace` of this layer's ``W0`` (shapes checked)."""
        if (sub.d_out, sub.d_in) != (self.out_features, self.in_features):
            raise ValueError(
                f"FORA-LoRA layer '{self.name}' is {self.out_features}x{self.in_features}, "
                f"the subspace is for {sub.d_out}x{sub.d_in}"
            )
        if sub.r != self.weight_rank:
            raise ValueError(
                f"FORA-LoRA layer '{self.name}' has weight_rank {self.weight_rank}, the subspace has r={sub.r}"
            )
        like = dict(device=self.fora_u.device, dtype=self.fora_u.dtype)
        self.fora_basis = sub.basis.detach().to(**like).contiguous().clone()
        self.fora_u.copy_(sub.u)
        self.fora_s.copy_(sub.s)
        self.fora_v.copy_(sub.v)
        self.fora_complement.fill_(bool(sub.complement))
        self.fora_ready.fill_(True)
        self._ready, self._complement = True, bool(sub.complement)

    @torch.no_grad()
    def bound_channel_(self, tau: float) -> None:
        """``delta <- clamp(delta, -tau S_r, tau S_r)`` in place (this rank's entries of a row-sharded ``delta``),
        after which ``||(W - W0) x|| <= tau ||W0 x||`` for every x in span(Q)."""
        self._require_ready("bound its channel")
        delta, shard = local_tensor(self.lora_delta.data), row_shard(self.lora_delta)
        s = self.fora_s if shard is None else shard.rows(self.fora_s)
        delta.copy_(bound_channel(delta, s, tau))

    def subspace(self) -> LayerSubspace:
        """The bases held by this layer, as a :class:`LayerSubspace` (float32, energy unknown)."""
        self._require_ready("read its subspace")
        return LayerSubspace(
            d_out=self.out_features,
            d_in=self.in_features,
            k=self.k,
            basis=self.fora_basis.float().clone(),
            complement=self._complement,
            u=self.fora_u.float().clone(),
            s=self.fora_s.float().clone(),
            v=self.fora_v.float().clone(),
        )

    def resize_basis_(self, k: int) -> None:
        """An uninitialised ``d_in x k`` ``fora_basis`` (same device, dtype), for a load of bases with that ``k``."""
        self.fora_basis = torch.empty(self.in_features, k, device=self.fora_basis.device, dtype=self.fora_basis.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Resize ``fora_basis`` to the stored ``k`` before loading, and refresh the ready flag after."""
        basis = state_dict.get(prefix + "fora_basis")
        if isinstance(basis, Tensor) and basis.dim() == 2 and basis.shape[0] == self.in_features:
            self.resize_basis_(basis.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready, self._complement = bool(self.fora_ready), bool(self.fora_complement)

    # ------------------------------------------------------------------ math
    def factors(self) -> tuple[Tensor, Tensor]:
        r"""``(B', A')`` with ``B' A' = (alpha/r_lora) P_U B A P_Q + U_r diag(delta) V_r^T`` (the whole update).

        ``A' = [A P_Q ; V_r^T]`` (``(r_lora + r) x d_in``), ``B' = [(alpha/r_lora) P_U B , U_r diag(delta)]``
        (``d_out x (r_lora + r)``), in the LoRA parameters' dtype, differentiable.
        """
        self._require_ready("build its update")
        dt = self.lora_A.dtype
        u = self.fora_u.to(dt)
        a_proj = right_project(self.lora_A, self.fora_basis.to(dt), self._complement)  # A P_Q
        b_proj = right_project(self.lora_B.T, u).T  # P_U B = (B^T P_U)^T
        a = torch.cat([a_proj, self.fora_v.T.to(dt)], 0)
        b = torch.cat([self.scaling * b_proj, u * self.lora_delta], 1)
        return b, a

    def delta_weight(self) -> Tensor:
        """``W - W0 = (alpha/r_lora) P_U B A P_Q + U_r diag(delta) V_r^T`` (``d_out x d_in``, float64)."""
        b, a = self.factors()
        return b.double() @ a.double()

    def forward(self, x: Tensor) -> Tensor:
        """``W0 x + b + B' A' drop(x)`` = ``W0 x + b + (alpha/r_lora) P_U B A P_Q drop(x) + U_r (delta * V_r^T drop(x))``."""
        result = self.base_layer(x)
        if not self._ready:
            self._check_unready_forward()
            return result
        return result + self.update(x).to(result.dtype)

    def update(self, x: Tensor) -> Tensor:
        """The branch ``B' A' drop(x)`` in the LoRA parameters' dtype (float32), autocast off: under bf16
        autocast a bf16 ``A P_Q`` would leak about 2^-8 of ``A`` into span(Q); the branch is rank
        ``r_lora + r``, so float32 costs little next to the base matmul."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            b, a = self.factors()
            h = self.lora_dropout(x.to(a.dtype))
            return (h @ a.T) @ b.T

    def _check_unready_forward(self) -> None:
        """Before the bases are set only a no-grad forward with ``B = 0``, ``delta = 0`` (== base) is allowed."""
        if self.training or (torch.is_grad_enabled() and self.lora_A.requires_grad):
            raise RuntimeError(
                f"FORA-LoRA layer '{self.name}': training forward before its bases (Q, U_r, V_r) are set. "
                "The ForaLoRA callback sets them in on_train_start (after calibration); outside Lightning call "
                "layer.set_subspace(...) first. Refusing rather than training an unprotected update"
            )
        if bool(self.lora_B.detach().any()) or bool(self.lora_delta.detach().any()):
            raise RuntimeError(
                f"FORA-LoRA layer '{self.name}' has a nonzero update (B or delta) but no bases: load its "
                "fora_basis/fora_u/fora_v buffers (the model's state dict) or call set_subspace(...)"
            )

    def _require_ready(self, what: str) -> None:
        if not self._ready:
            raise RuntimeError(f"FORA-LoRA layer '{self.name}' cannot {what}: its bases are not set (calibrate first)")

    def extra_repr(self) -> str:
        k = self.k if self._ready else "unset"
        return f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}, weight_rank={self.weight_rank}, k={k}"
