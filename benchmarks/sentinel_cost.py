"""The leakage sentinel's cost per check against a training step, its memory, and its readings by precision.

    nice python benchmarks/sentinel_cost.py                      # CPU, step_cost's cpu-small shapes (~1 min)
    python benchmarks/sentinel_cost.py --device cuda --model qwen3-1.7b --tokens 16384
    nice python benchmarks/sentinel_cost.py --readings           # clean-run readings at 32-true and bf16-true (~1 min)

Cost (default): the same ``--blocks`` decoder blocks' seven projections as ``step_cost.py`` (shapes from
``Qwen3Config``, random float32 weights, no bias), one random k-frame per distinct input, r = 8. A probe of
``--rows`` rows per input is captured as the sentinel does (:class:`~fora_lightning.probe.ProtectionProbe`), then
one sentinel check (``probe.read()``: every layer's forward on ``2 rows + 1`` rows, the channel fit, the norms) and
one plain training step (forward and both backward GEMMs for T tokens under bf16 autocast, then ``AdamW.step()``:
the cost of a step *without* FORA, so the ratio is an upper bound of the sentinel's share of a FORA step) are
timed round-robin. Amortised over ``log_every_n_steps`` steps, the share of a step is ``check / (every x step)``.

Readings (``--readings``): clean fits of ``bf16_true_leakage.py``'s MLP (256 -> 512 -> 256, calibration span 32,
weight_rank 8, AdamW lr 1e-3 wd 0.01, 200 steps) under 32-true and bf16-true, with FORA (update mode,
channel_bound 0.05) and FORA-LoRA, the sentinel checking every 10 steps: the worst readings against their
bounds. These set the bf16 numerical tolerance of ``fora_lightning/core/leakage.py``.
Writes ``benchmarks/results/sentinel_cost_<device>.{json,md}`` or ``benchmarks/results/sentinel_readings.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _bench import environment, interleaved, log, md_table, med, ratio_stats, spread, write
from step_cost import INPUT_OF, MODELS, block_shapes
from torch import nn

from fora_lightning.core.leakage import numerical_tolerance
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, build_subspace
from fora_lightning.probe import ProtectionProbe


class Blocks(nn.Module):
    """The projections of ``blocks`` decoder blocks; ``forward(inputs)`` runs each on its block's input of its kind."""

    def __init__(self, shapes: dict[str, tuple[int, int]], blocks: int, device: str) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(
            {f"b{j}_{n}": nn.Linear(d_in, d_out, bias=False, device=device) for j in range(blocks) for n, (d_out, d_in) in shapes.items()}
        )  # fmt: skip

    @staticmethod
    def group(name: str) -> str:
        block, kind = name.split("_", 1)
        return f"{block}_{INPUT_OF[kind]}"

    def forward(self, inputs: dict[str, torch.Tensor]) -> None:
        for name, m in self.layers.items():
            m(inputs[self.group(name)])


def subspaces(model: Blocks, k_frac: float, r: int, device: str) -> dict[str, LayerSubspace]:
    """A random orthonormal k-frame per distinct input (shared by its layers, as calibration gives) and U, S, V."""
    subs, bases, seeds = {}, {}, {}
    for name, m in model.layers.items():
        g = model.group(name)
        cfg = SubspaceConfig(
            source="random",
            rank=max(1, int(k_frac * m.in_features)),
            weight_rank=r,
            seed=seeds.setdefault(g, len(seeds)),
        )
        sub = build_subspace(name, m.weight.detach(), cfg).to(device)
        sub.basis = bases.setdefault(g, sub.basis)
        subs[f"layers.{name}"] = sub
    return subs  # fmt: skip


def cost(args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    shapes = block_shapes(args.model)
    torch.manual_seed(0)
    model = Blocks(shapes, args.blocks, args.device)
    subs = subspaces(model, args.k_frac, args.rank, args.device)
    modules = {f"layers.{n}": m for n, m in model.layers.items()}
    gen = torch.Generator(device=args.device).manual_seed(1)
    widths = {model.group(n): m.in_features for n, m in model.layers.items()}
    probe_in = {g: torch.randn(args.rows, d, generator=gen, device=args.device) for g, d in widths.items()}
    probe = ProtectionProbe(model, modules, subs)
    probe.capture(model, [probe_in], model, rows=args.rows)
    xs = {g: torch.randn(args.tokens, d, generator=gen, device=args.device, dtype=torch.bfloat16) for g, d in widths.items()}  # fmt: skip
    dys = {n: torch.randn(args.tokens, m.out_features, generator=gen, device=args.device, dtype=torch.bfloat16) for n, m in model.layers.items()}  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
            for n, m in model.layers.items():
                m(xs[model.group(n)]).backward(dys[n])
        opt.step()

    log(f"{args.model} x {args.blocks} blocks, T={args.tokens}, rows={args.rows}; timing {args.repeats} rounds")
    times = interleaved({"training step (no FORA)": step, "sentinel check": probe.read}, repeats=args.repeats)
    t_step, t_check = med(times["training step (no FORA)"]), med(times["sentinel check"])
    ratio, noise = ratio_stats(times["sentinel check"], times["training step (no FORA)"])
    weights = sum(m.weight.numel() * 4 for m in model.layers.values())
    nbytes = probe.nbytes()
    rows = [
        ["training step (no FORA)", t_step * 1e3, 1.0, spread(times["training step (no FORA)"]), "-", "-"],
        ["sentinel check", t_check * 1e3, ratio, noise, f"{100 * ratio / 50:.3f}%", f"{100 * ratio / 10:.2f}%"],
    ]
    table = md_table(["what", "ms", "x step", "noise", "share of a step, every 50 (default)", "every 10"], rows)
    table += (
        f"\n\n{args.model} shapes x {args.blocks} blocks ({len(modules)} layers), T = {args.tokens} tokens per step, "
        f"{args.rows} probe rows per input, k = {args.k_frac:g} d_in, r = {args.rank}, {args.device}, "
        f"{torch.get_num_threads()} threads. Probe memory {nbytes / 2**20:.2f} MiB "
        f"({100 * nbytes / weights:.2f}% of the protected float32 weights; rows x (d_in per input + d_in per "
        "(input, basis) + (2 rows + 1) x d_out per layer) x 4 bytes). Share of a step = check / (every x step), "
        "against a step without FORA (a FORA step costs more, so the share of a FORA step is smaller). "
        "noise = (max - min) / median of the per-round ratios.\n\n"
        f"Command: python benchmarks/sentinel_cost.py {' '.join(sys.argv[1:])}"
    )
    payload = {
        "args": vars(args),
        "step_s": t_step,
        "check_s": t_check,
        "check_over_step": ratio,
        "ratio_noise": noise,
        "probe_bytes": nbytes,
        "weight_bytes": weights,
        "environment": environment(),
    }
    write(args.name or f"sentinel_cost_{'cuda' if cuda else 'cpu'}", payload, table)


def readings(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    from bf16_true_leakage import MLP, data

    from fora_lightning import FORA, ForaLoRA

    out, rows = {}, []
    for precision in ("32-true", "bf16-true"):
        for who in ("FORA", "FORA-LoRA"):
            torch.manual_seed(0)
            task, calib, _ = data(args.steps)
            kw = dict(calibration=calib, target_modules=["fc1", "fc2"], energy=0.999, weight_rank=8, progress=False)
            cb = FORA(**kw) if who == "FORA" else ForaLoRA(**kw)
            trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=args.steps,
                                 log_every_n_steps=10, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])  # fmt: skip
            t = time.time()
            trainer.fit(MLP(), task)
            s = cb.protection.monitor.summary()
            leak, span = s["worst_leakage"], s["worst_span_change"]
            dtype = {"32-true": torch.float32, "bf16-true": torch.bfloat16}[precision]
            out[f"{precision} {who}"] = {**s, "seconds": time.time() - t}
            rows.append([precision, who, leak["value"], leak["layer"], numerical_tolerance(dtype), span["value"], span["bound"], s["verdict"]])  # fmt: skip
            log(f"{precision} {who}: leakage {leak['value']:.3g}, span {span['value']:.3g} <= {span['bound']:.3g}")
    table = md_table(
        ["precision", "callback", "worst leakage", "layer", "tolerance", "worst span change", "its bound", "verdict"],
        rows,
    )
    table += (
        f"\n\nWorst sentinel readings of {args.steps}-step clean fits (checked every 10 steps and at the end) of the MLP "
        "256 -> 512 -> 256 (calibration span 32, weight_rank 8, channel_bound 0.05, AdamW lr 1e-3 wd 0.01, batch 64; "
        "benchmarks/bf16_true_leakage.py's setting). leakage: outside the spectral channel, on the probe rows' span(Q) "
        "part; span change: all of it, against channel_bound x the base output + the tolerance.\n\n"
        f"Command: python benchmarks/sentinel_cost.py {' '.join(sys.argv[1:])}"
    )
    write(args.name or "sentinel_readings", {"args": vars(args), "runs": out, "environment": environment()}, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="cpu-small", choices=sorted(MODELS))
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="T per training step")
    p.add_argument("--rows", type=int, default=64, help="probe rows per input (the sentinel's default)")
    p.add_argument("--k-frac", type=float, default=0.25)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--readings", action="store_true", help="the clean-run readings by precision instead of the cost")
    p.add_argument("--steps", type=int, default=200, help="--readings: steps per fit")
    p.add_argument("--name", default=None, help="results/<name>.{json,md}")
    args = p.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args.readings:
        readings(args)
    else:
        cost(args)


if __name__ == "__main__":
    main()
