"""Calibration sufficiency: does the calibration data describe the capability? Measured on a held-out slice.

Per distinct layer input, ``C_in`` is the covariance of the batches the estimate's basis comes from and ``C_out``
that of the held-out slice (``fora_lightning.calibration.holdout_batch``), never used for that basis:

    held-out share    s   = tr(Q_in^T C_out Q_in) / tr(C_out)      Q_in: what the energy rule (or rank) picks from C_in
    target            t   = the requested energy (a fixed rank: the in-sample energy e_k of Q_in on C_in)
    uncaptured ratio  rho = (1 - s) / (1 - t)                        1 when Q_in holds as much of new data as asked

Data that describes the capability gives ``s`` close to ``t`` (``rho`` near 1); narrow data (a few near-duplicate
texts) gives a basis of its own few directions and ``rho`` of several. ``rho > RATIO_LINE`` is "short" unless the
fit below expects the final basis, on all ``N_in + N_out`` tokens, to reach the line.

Growth with tokens: the roles are swapped for a second point (the basis from the held-out slice, ``N_out`` tokens,
measured on ``C_in``). The shortfall ``d(N) = t - s(N)`` is fitted as a power law ``a N^-b`` through the two points,
which gives the expected share of the final basis (all ``N_in + N_out`` tokens) and the tokens ``N*`` at which the
shortfall reaches the line, ``d(N*) = (RATIO_LINE - 1)(1 - t)``. No growth (``b <= 0``): ``N* = inf`` (more of the
same data does not help: it is narrow in kind, not in amount).

Cost: one more ``d_in x d_in`` float64 eigendecomposition per distinct input (``C_in``) on top of the one of the
final basis, a second (``C_out``, the swapped point) only for inputs with a layer past the line, spread over ranks
under a process group; and the held-out sums (one more ``d_in x d_in`` accumulator per input) during the pass.
Plain torch: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.distributed import assign_owners, several_ranks
from fora_lightning.core.energy import captured_energy, cumulative_energy
from fora_lightning.core.subspace import SubspaceConfig, select_rank, spectrum

# rho above this on a layer: the calibration data is short for it (measured: results/calibration_curve/README.md)
RATIO_LINE = 3.0
MIN_SPREAD = 2.0  # the power-law fit needs the two token counts at least this factor apart
AUTO_SAMPLES = 4  # calibration_samples='auto': sampled continuations per row when the estimate says short
DUPLICATE_LINE = 0.5  # more than this share of the calibration rows repeating another row exactly: warned


@dataclass
class LayerSufficiency:
    """One layer's held-out measurement (tokens count that layer's input, after any token stride)."""

    layer: str
    k: int
    target: float
    share: float  # s: the basis of the batches kept in, on the held-out slice
    share_small: float | None  # the held-out slice's own basis on the kept-in batches (None: empty slice)
    tokens_in: int
    tokens_out: int
    expected_share: float | None  # the power-law fit at tokens_in + tokens_out (the final basis), None: no fit
    tokens_needed: float | None  # N*: inf when the shortfall does not fall with tokens, None: no fit

    @property
    def ratio(self) -> float:
        """``rho = (1 - s) / (1 - t)``."""
        return _ratio(self.share, self.target)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def held_out_shares(
    covariances: Covariances,
    names: Iterable[str],
    config: SubspaceConfig,
    line: float = RATIO_LINE,
    group: Any = None,
) -> dict[str, LayerSufficiency]:
    """:class:`LayerSufficiency` of each layer in ``names`` from ``covariances`` (the kept-in sums) and its
    ``held_out`` sums. Layers whose input has no held-out or no kept-in token are left out.

    The swapped point (``share_small``) and the power-law fit are computed only for inputs with a layer past
    ``line`` (adequate data: one extra eigh per input, not two). Under an initialised process group every rank
    must call this with the same (all-reduced) sums: each input is measured on one rank
    (:func:`~fora_lightning.core.distributed.assign_owners`) and the results are gathered to all."""
    held = covariances.held_out
    if held is None:
        return {}
    by_owner: dict[str, list[str]] = {}
    for name in names:
        o = covariances.owner[name]
        if covariances.counts.get(o, 0) and held.counts.get(o, 0):
            by_owner.setdefault(o, []).append(name)
    if not several_ranks(group):
        return {n: s for o, layers in by_owner.items() for n, s in _input_shares(covariances, o, layers, config, line)}
    plan = assign_owners({o: covariances.sums[o].shape[0] for o in by_owner}, dist.get_world_size(group))
    me = dist.get_rank(group)
    mine = [
        pair
        for o, layers in by_owner.items()
        if plan[o] == me
        for pair in _input_shares(covariances, o, layers, config, line)
    ]
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    gathered = dict(pair for part in every for pair in part)
    return {n: gathered[n] for layers in by_owner.values() for n in layers}


def _input_shares(
    covariances: Covariances, owner: str, layers: list[str], config: SubspaceConfig, line: float
) -> list[tuple[str, LayerSufficiency]]:
    """The layers reading input ``owner``: held-out share on the kept-in basis; the swapped point and the fit
    only when one of them is past ``line``."""
    held = covariances.held_out
    assert held is not None
    c_in, c_out = covariances.covariance(owner), held.covariance(owner)
    n_in, n_out = covariances.counts[owner], held.counts[owner]
    ev_in, q_in = spectrum(c_in)
    first, share_at, small_at = [], {}, {}  # by k: the layers of one input with the same k share their shares
    for name in layers:
        rank = config.rank_for(name)
        k = select_rank(ev_in, config.energy, rank, config.max_rank, name)
        target = config.energy if rank is None else _in_sample(ev_in, k)
        if k not in share_at:
            share_at[k] = captured_energy(q_in[:, :k], c_out)
        first.append((name, rank, k, target, share_at[k]))
    del q_in
    small_spectrum = spectrum(c_out) if any(_ratio(share, target) > line for *_, target, share in first) else None
    out = []
    for name, rank, k, target, share in first:
        small = expected = needed = None
        if small_spectrum is not None:
            ev_out, q_out = small_spectrum
            k_small = select_rank(ev_out, config.energy, rank, config.max_rank, name)
            target_small = config.energy if rank is None else _in_sample(ev_out, k_small)
            if k_small not in small_at:
                small_at[k_small] = captured_energy(q_out[:, :k_small], c_in)
            small = small_at[k_small]
            fit = _power_law((n_out, target_small - small), (n_in, target - share))
            if fit is not None:
                n_ref, d_ref, b = fit
                expected = target - d_ref * ((n_in + n_out) / n_ref) ** -b
                goal = (line - 1.0) * (1.0 - target)
                if target - share <= goal:
                    needed = float(n_in)
                else:
                    log_n = math.log(n_ref) + math.log(d_ref / goal) / b if b > 0 and goal > 0 else math.inf
                    needed = math.exp(log_n) if log_n < 700 else math.inf
        out.append((name, LayerSufficiency(name, k, target, share, small, n_in, n_out, expected, needed)))
    return out


def _ratio(share: float, target: float) -> float:
    return (1.0 - share) / max(1.0 - target, 1e-12)


def _in_sample(evals: Tensor, k: int) -> float:
    return float(cumulative_energy(evals)[k - 1]) if k > 0 else 0.0


def _power_law(p: tuple[int, float], q: tuple[int, float]) -> tuple[int, float, float] | None:
    """``d(N) = d_ref (N / n_ref)^-b`` through two points ``(N, d)``, as ``(n_ref, d_ref, b)`` with ``n_ref`` the larger
    N; ``b = 0`` (flat) when the shortfall does not fall with N; ``None`` when the token counts are less than
    ``MIN_SPREAD`` apart (two batches: the slope would be noise) or the larger N's shortfall is not positive."""
    (n1, d1), (n2, d2) = sorted([p, q])
    if n2 < MIN_SPREAD * n1 or d2 <= 0:
        return None
    return n2, d2, (math.log(d1 / d2) / math.log(n2 / n1) if d1 > d2 else 0.0)


@dataclass
class Sufficiency:
    """The estimate of one calibration: per layer, and the capability's tokens (``tokens``: all batches)."""

    layers: dict[str, LayerSufficiency]
    tokens: int
    line: float = RATIO_LINE
    before: dict[str, Any] | None = None  # calibration_samples='auto' extended the data: the first estimate's summary

    @property
    def short(self) -> list[LayerSufficiency]:
        """Layers past the line, worst first; not those whose fit expects the final basis (all tokens) to reach it."""
        return sorted(
            (s for s in self.layers.values() if s.ratio > self.line and not _reached(s)), key=lambda s: -s.ratio
        )

    def tokens_needed(self) -> float | None:
        """Capability tokens for every short layer to reach the line: each layer's ``N*`` scaled by the capability's
        tokens per token of its input; ``None`` when nothing is short or no layer could be fitted."""
        needs = [
            s.tokens_needed * self.tokens / (s.tokens_in + s.tokens_out)
            for s in self.short
            if s.tokens_needed is not None
        ]
        return max(needs) if needs else None

    def summary(self) -> dict[str, Any]:
        """The report's fields: mean and worst share and ratio, tokens used and needed, the verdict."""
        if not self.layers:
            return {"tokens": self.tokens, "verdict": self.verdict()}
        vals = list(self.layers.values())
        worst = max(vals, key=lambda s: s.ratio)
        needed = self.tokens_needed()
        return {
            "held_out_share_mean": sum(s.share for s in vals) / len(vals),
            "held_out_share_min": min(s.share for s in vals),
            "target": worst.target,
            "ratio_max": worst.ratio,
            "worst_layer": worst.layer,
            "short_layers": len(self.short),
            "layers": len(vals),
            "ratio_line": self.line,
            "tokens": self.tokens,
            "tokens_needed": None if needed is None else (needed if math.isfinite(needed) else "inf"),
            "verdict": self.verdict(),
            **({"before_samples": self.before} if self.before is not None else {}),
        }

    def verdict(self) -> str:
        """One line: enough, short (with the tokens estimate), or not measured."""
        if not self.layers:
            return "not measured: the calibration hold-out slice or the rest of the batches was empty (one batch only?)"
        short = self.short
        if not short:
            worst = max(self.layers.values(), key=lambda s: s.ratio)
            return (
                f"enough: the held-out slice keeps {worst.share:.3f}+ of its energy in every basis "
                f"(target {worst.target:.3f}; worst {worst.layer}) with {self.tokens:,} tokens"
            )
        needed = self.tokens_needed()
        more = (
            "more of the same data does not raise it (too narrow in kind)"
            if needed is not None and not math.isfinite(needed)
            else f"about {needed:,.0f} tokens estimated to reach the line"
            if needed is not None
            else "no token estimate"
        )
        return (
            f"short: {len(short)}/{len(self.layers)} layers hold only {short[-1].share:.3f}-{short[0].share:.3f} "
            f"of held-out energy (target {short[0].target:.3f}) with {self.tokens:,} tokens; {more}"
        )


def _reached(s: LayerSufficiency) -> bool:
    """The power-law fit puts ``N*`` within the tokens the final basis uses (kept-in plus held-out)."""
    return s.tokens_needed is not None and s.tokens_needed <= s.tokens_in + s.tokens_out


def sufficiency(
    covariances: Covariances, config: SubspaceConfig, tokens: int, names: Iterable[str] | None = None
) -> Sufficiency:
    """:func:`held_out_shares` over ``names`` (default: every layer of ``covariances``) as a :class:`Sufficiency`."""
    layers = held_out_shares(covariances, covariances.owner if names is None else names, config)
    return Sufficiency(layers, tokens)


def sufficiency_warning(estimate: Sufficiency, capability: str, holdout_every: int, who: str = "FORA") -> str | None:
    """The ``FORA:`` warning when ``estimate`` has short layers (worst three named), else ``None``."""
    short = estimate.short
    if not short:
        return None
    needed = estimate.tokens_needed()
    if needed is None:
        more = "no estimate of the tokens needed (no fit)"
    elif not math.isfinite(needed):
        more = "the held-out share does not grow with more of the same data: it is narrow in kind, not only in amount"
    else:
        more = f"about {needed:,.0f} tokens of the same kind are estimated to reach the line"
    worst = ", ".join(f"{s.layer} {s.share:.3f} (x{s.ratio:.1f})" for s in short[:3])
    return (
        f"FORA: {who} calibration: the data of capability '{capability}' does not describe it well: on its hold-out "
        f"slice (every {holdout_every}-th batch) {len(short)} of {len(estimate.layers)} layers keep less of the "
        f"energy than the target {short[0].target:.3f}, more than {estimate.line:g}x the uncaptured share asked "
        f"(worst: {worst}). {estimate.tokens:,} calibration tokens were used; {more}. Inputs of the capability "
        "outside those bases are not protected. Remedies: more and more varied calibration data of the capability; "
        "calibration_samples='auto' or N (adds the model's own sampled continuations of each row); "
        "calibration_generate=N when the rows are prompts only; a lower energy protects fewer directions but "
        "states it honestly. calibration_holdout=0 turns the estimate off (docs/calibration.md)"
    )


def duplicate_warning(rows: int, distinct: int, capability: str, who: str = "FORA") -> str | None:
    """The ``FORA:`` warning when more than ``DUPLICATE_LINE`` of the calibration rows repeat another row exactly
    (the held-out estimate compares the data with itself: repeats spread over the slice pass it), else ``None``."""
    if rows == 0 or rows - distinct <= DUPLICATE_LINE * rows:
        return None
    return (
        f"FORA: {who} calibration: {rows - distinct:,} of the {rows:,} calibration rows of capability '{capability}' "
        f"repeat another row exactly ({distinct:,} distinct). The held-out estimate compares the data with itself, so "
        "it cannot tell repeated data from data that describes the capability: the bases hold the directions of "
        f"{distinct:,} texts. Remedies: more distinct calibration rows of the capability; calibration_samples=N "
        "(sampled continuations differ between repeats) (docs/calibration.md)"
    )
