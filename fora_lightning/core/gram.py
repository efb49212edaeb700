"""The per-batch Gram product ``S += X^T X`` of the covariance pass, and the ways to make it cheaper.

- ``panel = p > 0``: only the upper-triangular row panels ``S[r_i, r_i:] += X[:, r_i]^T X[:, r_i:]`` over
  ``b = ceil(d / p)`` column blocks ``r_i`` (``(b + 1) / (2b)`` of the flops); the strict lower block
  triangle is filled once, by :func:`mirror_`, when the pass ends. Exact: the same sums up to float rounding.
- ``product="input"``: the GEMM runs in the activations' own dtype when they are bf16/fp16 (CUDA:
  ``torch.mm(..., out_dtype=float32)``, float32 out; CPU has no such kernel: the batch's product is
  rounded to bf16/fp16 before the float32 add). ``"accumulator"``: the inputs are cast to the
  accumulator's dtype first (exact float32 arithmetic).

Plain torch: no Lightning import.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Product = Literal["accumulator", "input"]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def block_edges(d: int, panel: int) -> list[int]:
    """The ``b + 1`` boundaries of ``b = ceil(d / panel)`` near-equal column blocks of ``0..d`` (``panel <= 0``: one)."""
    b = max(1, -(-d // panel)) if panel > 0 else 1
    return [i * d // b for i in range(b + 1)]


def flop_fraction(d: int, panel: int) -> float:
    """Flops of the panelled product over the full ``X^T X``: ``(b + 1) / (2b)``."""
    b = len(block_edges(d, panel)) - 1
    return (b + 1) / (2 * b)


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` with a float32 result where the device has a mixed-dtype kernel (CUDA), else in ``a``'s dtype."""
    if a.is_cuda and a.dtype != out_dtype:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b)


def gram_(acc: Tensor, x: Tensor, panel: int = 0, product: Product = "accumulator") -> None:
    """``acc += X^T X`` for the rows of ``x`` (``T x d``); with ``panel > 0`` only the upper block triangle."""
    if product == "accumulator" or x.dtype not in LOW_PRECISION:
        x = x.to(acc.dtype)
    edges = block_edges(x.shape[1], panel)
    same = x.dtype == acc.dtype
    for lo, hi in zip(edges[:-1], edges[1:]):
        block, rest = x[:, lo:hi].T, x[:, lo:]
        if same:
            acc[lo:hi, lo:].addmm_(block, rest)
        else:
            acc[lo:hi, lo:].add_(_mm(block, rest, acc.dtype))


def mirror_(acc: Tensor, panel: int) -> Tensor:
    """Fill the strict lower block triangle left by :func:`gram_` from the upper one (in place; returns ``acc``)."""
    edges = block_edges(acc.shape[0], panel)
    for lo, hi in zip(edges[1:-1], edges[2:]):
        acc[lo:hi, :lo].copy_(acc[:lo, lo:hi].T)
    return acc
