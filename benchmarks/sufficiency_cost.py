"""The calibration sufficiency estimate's fit-start cost against the final basis's own eigendecomposition.

    nice python benchmarks/sufficiency_cost.py           # SmolLM2-135M widths (576, 1536), Qwen3-1.7B's 2048 (~2 min)
    nice python benchmarks/sufficiency_cost.py --big     # adds Qwen3-1.7B's MLP width 6144 (several minutes more)

Per distinct layer input of width ``d``: float64 covariances of ``--tokens`` kept-in rows and 1/8 as many held-out
rows (power-law spectrum ``i^-1.5``, the same for both: data that describes the capability), timed round-robin:

- the final basis: one ``spectrum`` (eigh) of ``C_in + C_out``, which every fit pays;
- the estimate as it runs now (``held_out_shares``, adequate data): the kept-in batches' eigh, the shares, and the
  swapped point only for inputs past the line;
- the estimate as it ran before (every input: the kept-in eigh and the slice's eigh, the power-law fit): the same
  function with ``line=-1`` (every layer past it).

The ratios are the estimate's share of the fit-start eigh work. Under DDP/FSDP each input is measured on one rank
(``assign_owners``), so the per-rank cost divides by the world size as the final bases' eigh does.
Writes ``benchmarks/results/sufficiency_cost.{json,md}``.
"""

from __future__ import annotations

import argparse

import torch
from _bench import environment, interleaved, log, md_table, med, ratio_stats, write

from fora_lightning.core.covariance import Covariances
from fora_lightning.core.subspace import SubspaceConfig, spectrum
from fora_lightning.core.sufficiency import held_out_shares


def covariances(d: int, tokens: int, seed: int) -> Covariances:
    """Kept-in and held-out sums (1/8 as many rows) of one input read by two layers (as q/k/v share one)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(
        -0.75
    )  # eigenvalues ~ i^-1.5: k about 0.4-0.6 d at energy 0.99

    def rows(n: int) -> torch.Tensor:
        return torch.randn(n, d, generator=gen, dtype=torch.float64) * scale

    x_in, x_out = rows(tokens), rows(tokens // 8)
    held = Covariances({"x": x_out.T @ x_out}, {"x": x_out.shape[0]}, {"x": "x"})
    return Covariances({"x": x_in.T @ x_in}, {"x": tokens}, {"x": "x", "a": "x", "b": "x"}, held_out=held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="add d = 6144 (Qwen3-1.7B's MLP input)")
    parser.add_argument("--tokens", type=int, default=8192, help="kept-in calibration rows per input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SubspaceConfig(energy=0.99)
    rows, runs = [], []
    for d in (576, 1536, 2048, *((6144,) if args.big else ())):
        cov = covariances(d, args.tokens, seed=d)
        whole = cov.covariance("x") * cov.counts["x"] + cov.held_out.covariance("x") * cov.held_out.counts["x"]
        now = held_out_shares(cov, ["a", "b"], config)
        log(f"d={d}: held-out ratio {now['a'].ratio:.2f} (k={now['a'].k})")
        times = interleaved(
            {
                "final basis eigh": lambda w=whole: spectrum(w),
                "estimate now": lambda c=cov: held_out_shares(c, ["a", "b"], config),
                "estimate before": lambda c=cov: held_out_shares(c, ["a", "b"], config, line=-1.0),
            },
            repeats=args.repeats,
        )
        now_x, now_noise = ratio_stats(times["estimate now"], times["final basis eigh"])
        before_x, before_noise = ratio_stats(times["estimate before"], times["final basis eigh"])
        rows.append(
            [d, now["a"].k, f"{now['a'].ratio:.2f}", f"{med(times['final basis eigh']):.3f}", f"{before_x:.2f}",
             f"{before_noise:.2f}", f"{now_x:.2f}", f"{now_noise:.2f}"]
        )  # fmt: skip
        runs.append({"d": d, "k": now["a"].k, "ratio": now["a"].ratio, "seconds": times})
    table = md_table(
        ["d_in", "k", "held-out ratio rho", "final basis eigh s", "estimate before x eigh", "noise",
         "estimate now x eigh", "noise"],
        rows,
    )  # fmt: skip
    table += (
        f"\n\nFloat64 covariances of {args.tokens} kept-in and {args.tokens // 8} held-out rows per input (eigenvalues "
        f"~ i^-1.5), energy 0.99, two layers reading the input; {args.threads} threads, {args.repeats} rounds "
        "round-robin. 'x eigh': the estimate's time over the final basis's eigh of the same input, median of the "
        "per-round ratios; noise = (max - min) / median of those ratios. Before: the kept-in and the slice's eigh for "
        "every input; now: the slice's only for inputs past the line (rho > 3), none here.\n\n"
        f"Command: python benchmarks/sufficiency_cost.py{' --big' if args.big else ''}"
    )
    print(table)
    write("sufficiency_cost", {"args": vars(args), "runs": runs, "environment": environment()}, table)


if __name__ == "__main__":
    main()
