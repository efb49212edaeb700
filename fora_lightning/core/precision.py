"""Cheap-arithmetic FORA projections, safe because only *small* tensors meet low-precision GEMMs.

A GEMM of unit roundoff ``u`` computes ``A B`` with error ``~ u |A| |B|`` (FORA.md, "Rounding error
scales with what is multiplied"). Per update-mode step FORA runs four ``d_out d_in k`` GEMMs:

- ``Pi(G)`` (two): any error is removed again by the post-step re-projection, so they run in ``precision``;
- ``D Q = W Q - A0`` (one): multiplies the full weight, error ``u |W|`` would stay outside S. It runs in
  float32, or as an error-compensated split ``W Q ~ W_h Q_h + W_l Q_h + W_h Q_l`` (``X_h`` = X rounded to the
  low format, ``X_l = X - X_h``) of three low-precision GEMMs with float32 outputs (error ``~ u^2 |W|``) where the
  device has them (CUDA: TF32 always, bf16 with ``torch.mm(..., out_dtype=float32)``);
- ``(D Q) Q^T`` (one): multiplies ``D Q``, the part of the step that left S; error ``u |D Q|``, and since the
  next step recomputes ``D Q`` from the anchors, that error is removed again and does not accumulate.

Unit roundoffs: TF32 ``2^-11``, bf16 ``2^-8`` (CPU bf16 GEMMs also round their output to bf16). Plain torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from fora_lightning.core.projection import AllReduce, _channel_free, _left_coords, left_correction

Precision = Literal["auto", "float32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "tf32", "bf16")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}
LEAK_TOLERANCE = 2.5e-6  # per-step bound on the cheap correction's error, relative to ||A0||: 1/4 of the 1e-5 goal


def resolve_precision(precision: str, device: torch.device | str, mode: str = "update", flat: bool = False) -> str:
    """The arithmetic a fit uses: ``precision`` itself unless ``"auto"``, with the fallbacks below.

    ``auto``: ``"tf32"`` on CUDA devices of compute capability >= 8.0 (the compensated ``W Q`` at
    ``~ 2^-22 |W|``); ``"bf16"`` on CPUs with native bf16 GEMMs (AVX512-BF16 / AMX; ``W Q`` stays float32
    there, as CPU bf16 GEMMs round their output); else ``"float32"``. ``"tf32"`` on a CPU is float32
    arithmetic (CPUs have no TF32) and resolves to ``"float32"``. Always ``"float32"`` for FSDP1 flat
    parameters (``flat``), and ``"auto"`` is ``"float32"`` in ``mode="gradient"`` (no re-projection removes
    the gradient projection's GEMM error there).
    """
    dev = torch.device(device)
    if flat or (precision == "auto" and mode != "update"):
        return "float32"
    if precision == "auto":
        if dev.type == "cuda":
            return "tf32" if torch.cuda.get_device_capability(dev)[0] >= 8 else "float32"
        if dev.type == "cpu":
            fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return "bf16" if fast else "float32"
        return "float32"
    if precision == "tf32" and dev.type != "cuda":
        return "float32"
    return precision


@contextlib.contextmanager
def gemm_precision(precision: str) -> Iterator[None]:
    """Within: float32 CUDA matmuls may use TF32 tensor cores when ``precision == "tf32"`` (restored on exit)."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _gemm_dtype(precision: str, t: Tensor) -> torch.dtype:
    if t.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if precision == "bf16" else torch.float32


def project_cheap(
    x: Tensor,
    basis: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    precision: str = "bf16",
    complement: bool = False,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """``Pi(X) = P_U X P_Q + U diag(diag(U^T X V)) V^T`` (float32 result) with the two ``d_out d_in k``
    GEMMs of ``X P_Q`` in ``precision``; the rank-r terms (``U^T X``, ``U M``) stay float32.

    Error ``~ u |X|`` (``u``: :data:`UNIT_ROUNDOFF`): use it on small tensors (a step, a gradient), never on W.
    """
    x32 = x.float() if x.dtype != torch.float64 else x
    low = _gemm_dtype(precision, x)
    q = basis.to(low)
    xl = x32.to(low)
    with gemm_precision(precision):
        coords = xl @ q
        part = (coords @ q.mT).to(x32.dtype)  # X Q Q^T (or X C C^T)
        out = part if complement else x32 - part
        if u is not None and u.shape[-1] > 0:
            u32, v32 = u.to(x32.dtype), v.to(x32.dtype)
            m = _channel_free(_left_coords(u32, x32, all_reduce), basis.to(x32.dtype), v32, complement)
            out = out.addmm_(u32, m, alpha=-1) if out.dim() == 2 else out.baddbmm_(u32, m, alpha=-1)
    return out


def _split(x: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """``(x_h, x_l)``: ``x_h`` exactly representable in the low format, ``x_l = x - x_h`` (float32)."""
    if precision == "tf32":  # keep 10 explicit mantissa bits: zero the low 13 of float32's 23
        hi = (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    else:
        hi = x.to(torch.bfloat16).float()
    return hi, x - hi


def _mm_f32(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """``a b`` with float32 output; the inputs are exactly representable in ``precision``'s format (off CUDA
    a float32 GEMM of those inputs: the same numbers, used to test the split)."""
    if precision == "bf16" and a.device.type == "cuda":
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    with gemm_precision(precision):
        return a @ b


def split_supported(precision: str, device: torch.device | str) -> bool:
    """Whether ``device`` runs low-precision GEMMs with float32 output (the compensated ``W Q``)."""
    dev = torch.device(device)
    if dev.type != "cuda" or precision == "float32":
        return False
    if precision == "tf32":
        return True
    try:
        torch.mm(
            torch.ones(1, 1, dtype=torch.bfloat16, device=dev),
            torch.ones(1, 1, dtype=torch.bfloat16, device=dev),
            out_dtype=torch.float32,
        )
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def weight_coords(weight: Tensor, basis: Tensor, precision: str, split: bool) -> Tensor:
    """``W Q`` (float32) to float32 accuracy: one float32 GEMM, or with ``split`` three ``precision`` GEMMs
    ``W_h Q_h + W_l Q_h + W_h Q_l`` (dropped ``W_l Q_l``: relative error ``~ u^2``)."""
    w = weight.float()
    if not split or precision == "float32" or w.dtype == torch.float64 or w.dim() != 2:
        return w @ basis.to(w.dtype)
    wh, wl = _split(w, precision)
    qh, ql = _split(basis.float(), precision)
    out = _mm_f32(wh, qh, precision)
    out += _mm_f32(wl, qh, precision)
    out += _mm_f32(wh, ql, precision)
    return out


@torch.no_grad()
def project_weight_mixed_(
    weight: Tensor,
    basis: Tensor,
    anchor_q: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    anchor_u: Tensor | None = None,
    *,
    precision: str = "bf16",
    split: bool = False,
    all_reduce: AllReduce | None = None,
    s: Tensor | None = None,
    channel_bound: float | None = None,
) -> Tensor:
    """In place ``W <- W0 + Pi(W - W0)`` from the anchors, as
    :func:`~fora_lightning.core.projection.project_weight_` but with ``(D Q) Q^T`` in ``precision`` and
    ``D Q = W Q - A0`` from :func:`weight_coords`. Leaves ``~ u |D Q|`` (not ``u |W|``) outside S, removed again
    next step; the cheap correction is used only while ``2 u ||D Q||_F <= LEAK_TOLERANCE ||A0||_F`` (else float32;
    one host sync per layer). ``all_reduce``, ``s``, ``channel_bound`` as in ``project_weight_`` (the norms are then of local rows). Returns ``weight``."""
    w = weight.float() if weight.dtype != torch.float64 else weight
    dq = weight_coords(w, basis, precision, split).sub_(anchor_q.to(w.dtype))
    m = left_correction(w, basis, u, v, anchor_u, all_reduce=all_reduce, s=s, channel_bound=channel_bound)
    # the cheap (D Q) Q^T errs by ~2u ||D Q||: where that exceeds the tolerance (a large leak this step), float32
    cheap = 2 * UNIT_ROUNDOFF[precision] * float(dq.norm()) <= LEAK_TOLERANCE * float(anchor_q.norm())
    low = _gemm_dtype(precision, w) if cheap else w.dtype
    with gemm_precision(precision if cheap else "float32"):
        part = dq.to(low) @ basis.to(low).mT  # (D Q) Q^T
    w.sub_(part)
    if m is not None:
        w.addmm_(u.to(w.dtype), m, alpha=-1)
    if w is not weight:
        weight.copy_(w)
    return weight
