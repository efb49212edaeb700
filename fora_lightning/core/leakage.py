r"""The leakage sentinel's arithmetic: what a protected layer's *outputs* may do on span(Q), and what they did.

For a few probe rows ``X`` (``n x d_in``) of one protected layer ``f(x) = W x + b``, their part in span(Q)
``X_Q = X - X P_Q = X Q Q^T``, and the base outputs stored once at fit start (``Y0 = f0(X_Q)``, ``z0 = f0(0) = b0``),
a later reading ``Y = f(X_Q)`` gives ``diff = Y - Y0 = X_Q (W - W0)^T + 1 (b - b0)^T`` and

.. math::

    \text{span change} = \frac{\|Y - Y_0\|_F}{\|Y_0\|_F}, \qquad
    \text{leakage} = \frac{\| Y - Y_0 - (X_Q V_r)\,\mathrm{diag}(\hat\delta)\,U_r^T \|_F}{\|Y_0\|_F},
    \quad \hat\delta_i = \frac{\langle (Y - Y_0) u_i,\ X_Q v_i \rangle}{\|X_Q v_i\|^2}

(``leakage``: the spectral channel's best fit, column by column, taken out). When ``W - W0`` lies in FORA's set
``S = {P_U M P_Q + U_r diag(delta) V_r^T}`` and the bias did not move, ``diff = (X_Q V_r) diag(delta) U_r^T``, so
``leakage = 0`` (``delta_hat = delta``), and with a bounded channel ``|delta_i| <= tau S_i``

.. math:: \|Y - Y_0\|_F \le \tau \|X_Q W_0^T\|_F = \tau \|Y_0 - 1 z_0^T\|_F,

so ``span change <= tau ||Y0 - z0|| / ||Y0||`` (:func:`span_bound`). Both hold up to rounding:
:data:`NUMERICAL_TOLERANCE`, by the dtype the layer computes in. Inputs outside span(Q) are not covered by any
guarantee; :func:`heldout_tolerance` states what a reading on the raw rows is compared with (informational).

Everything is read from outputs, never from ``W0`` or the anchors: whatever moved the output (an optimizer, value
clipping, a hand-written step, a rebuilt layer, a trained bias) is seen. Plain torch: no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fora_lightning.core.projection import AllReduce, right_project

# The slack a reading may exceed its certified bound by, from rounding, by the dtype the layer computes in (its
# output dtype). float32: the project's 1e-5 goal (FORA.md); clean float32 runs read 1e-7 to 1e-6. bfloat16
# (bf16-true): storing W in bf16 rounds each element by up to 2^-9 of |W| after every step, and the probe's own
# forward rounds its outputs to bf16; clean 200-step fits read up to 3.0e-3 (benchmarks/results/sentinel_readings.md),
# so 1.5e-2 (2^-6) leaves a 5x margin. float16 (16-true): the bf16 value scaled by the unit-roundoff ratio 2^-3
# (not measured: AdamW at 16-true diverges in that setting).
NUMERICAL_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1.5e-2,
    torch.float16: 2e-3,
}


def numerical_tolerance(dtype: torch.dtype) -> float:
    """:data:`NUMERICAL_TOLERANCE` for ``dtype`` (float32's for any other floating dtype)."""
    return NUMERICAL_TOLERANCE.get(dtype, NUMERICAL_TOLERANCE[torch.float32])


def span_part(x: Tensor, basis: Tensor, complement: bool = False) -> Tensor:
    """``X_Q = X - X P_Q`` (``X Q Q^T``), for ``basis`` Q or, with ``complement``, its complement's basis."""
    return x - right_project(x, basis.to(x), complement)


def channel_residual(
    diff: Tensor, x_q: Tensor, u: Tensor | None, v: Tensor | None, all_reduce: AllReduce | None = None
) -> Tensor:
    """``diff - (X_Q V) diag(delta_hat) U^T`` (module docstring): ``diff`` with the spectral channel's best fit removed.

    ``diff`` is ``n x d_out`` (this rank's output columns under a row-sharded weight: pass the same rows of ``u``
    and an ``all_reduce`` summing ``n x r`` over the shard group); ``u``: ``d_out x r``, ``v``: ``d_in x r``.
    ``u=None`` or ``r = 0``: ``diff`` itself. A column with ``X_Q v_i = 0`` gets ``delta_hat_i = 0``.
    """
    if u is None or v is None or u.shape[-1] == 0:
        return diff
    a = diff @ u.to(diff)  # n x r: (Y - Y0) U
    if all_reduce is not None:
        a = all_reduce(a)
    b = x_q.to(diff) @ v.to(diff)  # n x r: X_Q V
    den = b.square().sum(0)
    delta = torch.where(den > 0, (a * b).sum(0) / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return diff - (b * delta) @ u.to(diff).T


def span_bound(tau: float, base_norm: float, bias_free_norm: float, tolerance: float) -> float:
    """``tau ||Y0 - 1 z0^T|| / ||Y0|| + tolerance``: the certified ceiling of the span change under ``channel_bound = tau``
    (``base_norm = ||Y0||_F``, ``bias_free_norm = ||X_Q W0^T||_F``)."""
    return tau * bias_free_norm / max(base_norm, 1e-300) + tolerance


def heldout_tolerance(
    tau: float | None, raw_norm: float, bias_free_norm: float, outside_norm: float, tolerance: float
) -> float | None:
    r"""What a reading on the raw rows ``X = X_Q + X_perp`` is compared with (informational, not certified).

    ``f(X) - f0(X) = X_Q D^T + X_perp D^T`` (+ the bias change). The first term is certified (``<= tau ||X_Q W0^T||``);
    nothing bounds the second: span(Q) misses ``X_perp``. Allowing the fine-tune to change the layer's response on
    ``X_perp`` by up to its base response (``||X_perp D^T|| <= ||X_perp W0^T||``, a relative change of 100 %):

    .. math:: \frac{\|f(X) - f_0(X)\|}{\|f_0(X)\|} \le \frac{\tau \|X_Q W_0^T\| + \|X_\perp W_0^T\|}{\|f_0(X)\|},

    ``raw_norm = ||f0(X)||``, ``outside_norm = ||X_perp W0^T|| = ||f0(X) - f0(X_Q)||``. ``tau = None`` (an unbounded
    channel): ``None``, nothing can be stated.
    """
    if tau is None:
        return None
    return (tau * bias_free_norm + outside_norm) / max(raw_norm, 1e-300) + tolerance
