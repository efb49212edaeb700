"""FORA's cost per optimizer step, side by side with plain training, with memory and leakage from the same run.

    nice python benchmarks/step_cost.py                                   # CPU, scaled-down Qwen3 shapes (~3 min)
    nice python benchmarks/step_cost.py --tokens 4096 --steps 20 --name step_cost_cpu_T4096   # larger T
    python benchmarks/step_cost.py --device cuda --model qwen3-1.7b       # one GPU: Qwen3-1.7B shapes, 16,384 tokens

Every variant trains its own copy of the same ``--blocks`` decoder blocks' seven projections (q, k, v, o, gate,
up, down; shapes from transformers' ``Qwen3Config``, random weights) with AdamW (weight decay 0.1):

- ``plain``: the training GEMMs alone (forward ``Y = X W^T`` and both backward GEMMs for T tokens, in
  ``--train-dtype``, bf16 autocast by default, float32 master weights) then ``AdamW.step()``;
- ``fora <precision>``: the same step plus FORA's update-mode work as the Callback runs it
  (``TargetLayout.project_grads`` before the step, ``reproject`` after, ``channel_bound`` at its default), for
  ``precision`` in float32, tf32, bf16 and auto (the default; the row names what it resolved to), auto with
  ``offload_anchors`` (anchors in host memory, copied per layer at each re-projection: device memory drops), and
  ``update-only`` in float32 and auto (``project_gradients=False``: no ``project_grads``, the re-projection alone).

The steps run round-robin (one of each variant per round), so load changes on a shared machine hit all alike;
time = median over rounds, ratio = median of per-round ratios to ``plain``. Leakage after all those steps, on
held-out inputs in span(Q): ``||(D - channel) X|| / ||W0 X||`` (D = W - W0 minus its spectral-channel part
``U diag(diag(U^T D V)) V^T``, which ``channel_bound`` certifies separately), the max over layers. Bases: a random
orthonormal k-frame per distinct input (q/k/v share one, gate/up one: as calibration would), k = ``--k-frac`` d_in.
Memory: persistent FORA bytes (bases once per distinct input, anchors, U, S, V) against the protected weights'
float32 bytes and against the floor ``min(k, d_in - k) x d_in`` float32 per distinct input.
"""

from __future__ import annotations

import argparse
import copy
import csv
from dataclasses import replace

import torch
from _bench import RESULTS, environment, interleaved, log, md_table, med, ratio_stats, spread, write
from torch import nn

from fora_lightning.config import ForaConfig
from fora_lightning.core.precision import resolve_precision, split_supported
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, build_subspace, complement_basis
from fora_lightning.layerwise_step import LayerwiseStep
from fora_lightning.layout import TargetLayout
from fora_lightning.metrics import leakage

MODELS = {  # Qwen3Config overrides; "cpu-small" keeps Qwen3-1.7B's proportions at 1/4 width
    "qwen3-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "cpu-small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 128,
    },
}
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}  # fmt: skip


def block_shapes(model: str) -> dict[str, tuple[int, int]]:
    """``name -> (d_out, d_in)`` of one decoder block's projections, read from a ``Qwen3Config``."""
    from transformers import Qwen3Config

    c = Qwen3Config(**MODELS[model])
    h, i, q, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    )
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip


def build(
    shapes: dict[str, tuple[int, int]], blocks: int, k_frac: float, r: int, device: str
) -> tuple[nn.ModuleDict, dict[str, LayerSubspace]]:
    """Random float32 linears ``b<j>.<name>`` and their subspaces (one random k-frame per distinct input)."""
    torch.manual_seed(0)
    layers = nn.ModuleDict()
    subs: dict[str, LayerSubspace] = {}
    bases: dict[str, torch.Tensor] = {}
    groups: dict[str, int] = {}
    for j in range(blocks):
        for name, (d_out, d_in) in shapes.items():
            lin = nn.Linear(d_in, d_out, bias=False, device=device)
            key = f"b{j}.{name}"
            layers[key.replace(".", "_")] = lin
            group = f"b{j}.{INPUT_OF[name]}"
            cfg = SubspaceConfig(
                source="random",
                rank=max(1, int(k_frac * d_in)),
                weight_rank=r,
                seed=groups.setdefault(group, len(groups)),
            )
            sub = build_subspace(key, lin.weight.detach(), cfg).to(device)
            sub.basis = bases.setdefault(group, sub.basis)
            subs[key.replace(".", "_")] = sub
    return layers, subs


def complement_where_smaller(subs: dict[str, LayerSubspace]) -> dict[str, LayerSubspace]:
    """The bases as FORA stores them without anchors: the complement of span(Q) where k > d_in/2 (shared per input)."""
    out, comp = {}, {}
    for n, s in subs.items():
        if s.k > s.d_in / 2:
            c = comp.setdefault(id(s.basis), complement_basis(s.basis))
            out[n] = replace(s, basis=c, complement=True)
        else:
            out[n] = replace(s)
    return out


class Variant:
    """One training run: its own weights, AdamW state and (for FORA) layout and anchors."""

    def __init__(
        self,
        layers: nn.ModuleDict,
        subs: dict[str, LayerSubspace] | None,
        precision: str,
        args: argparse.Namespace,
        on_host: bool = False,
        project_gradients: bool = True,
        reprojection: str = "anchors",
    ) -> None:
        self.layers = copy.deepcopy(layers)
        self.w0 = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.subs = copy.deepcopy(subs) if subs is not None else None  # one deepcopy: shared bases stay shared
        self.precision, self.device, self.dtype = precision, args.device, getattr(torch, args.train_dtype)
        self.project_gradients, self.reprojection = project_gradients, reprojection
        self.opt = torch.optim.AdamW(self.layers.parameters(), lr=args.lr, weight_decay=0.1)
        self.channel_bound = ForaConfig().channel_bound
        if self.subs is not None:
            self.layout = TargetLayout(dict(self.layers.items()), self.layers)
            self.split = split_supported(precision, args.device)
            if reprojection == "anchors":
                self.layout.attach_anchors(self.subs, on_host=on_host)
            else:  # the Callback's default: the AdamW step taken layer by layer, each layer's step projected
                for sub in self.subs.values():
                    sub.delta = torch.zeros(sub.r, device=sub.u.device)
                units, done = self.layout.step_units(self.subs, self.channel_bound)
                LayerwiseStep(self.opt, units, done).install()

    def step(self, xs: dict[str, torch.Tensor], dys: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=False)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            for n, m in self.layers.items():
                m(xs[n]).backward(dys[n])
        if self.subs is not None and self.project_gradients:
            self.layout.project_grads(self.subs, self.precision)
        self.opt.step()
        if self.subs is not None and self.reprojection == "anchors":
            self.layout.reproject(self.subs, self.precision, self.split, self.channel_bound)

    def leak(self, subs: dict[str, LayerSubspace], n_held: int) -> float:
        """Max over layers of the span-input leakage of ``D`` less its channel part (float64)."""
        worst = 0.0
        for i, (n, m) in enumerate(self.layers.items()):
            s = subs[n]
            d = (m.weight.detach() - self.w0[n]).double()
            u, v = s.u.double(), s.v.double()
            d = d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
            gen = torch.Generator(device=self.device).manual_seed(1000 + i)
            q = complement_basis(s.basis.double()) if s.complement else s.basis.double()
            x = torch.randn(n_held, s.k, generator=gen, device=self.device, dtype=torch.float64) @ q.T
            worst = max(worst, leakage(d, self.w0[n], x))
        return worst


def memory(subs: dict[str, LayerSubspace], layers: nn.ModuleDict) -> dict[str, float]:
    """Persistent FORA device bytes (each basis tensor once; host-resident anchors left out) vs protected float32
    weight bytes and the basis floor."""
    seen: dict[int, torch.Tensor] = {}
    other = 0
    for s in subs.values():
        seen[id(s.basis)] = s.basis
        other += s.nbytes(host=False) - s.basis.numel() * s.basis.element_size()
    basis = sum(b.numel() * b.element_size() for b in seen.values())
    floor = sum(min(b.shape[1], b.shape[0] - b.shape[1]) * b.shape[0] * 4 for b in seen.values())
    weights = sum(m.weight.numel() * 4 for m in layers.values())
    total = basis + other
    return {"bytes": total, "bytes_per_layer": total / len(subs), "pct_of_weights": 100 * total / weights,
            "pct_of_floor": 100 * total / floor, "basis_bytes": basis, "anchor_and_channel_bytes": other, "floor_bytes": floor}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--model", default=None, choices=sorted(MODELS), help="default: cpu-small on CPU, qwen3-1.7b on CUDA"
    )
    p.add_argument("--blocks", type=int, default=None, help="decoder blocks")
    p.add_argument("--tokens", type=int, default=None, help="T per step (default 1024 on CPU, 16384 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps per variant (default 50 on CPU, 200 on CUDA)")
    p.add_argument("--k-frac", type=float, default=0.25)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 1 on CPU: a shared machine's descheduled threads stall every GEMM)",
    )
    p.add_argument("--name", default=None, help="results/<name>.{json,csv,md} (default step_cost_<device>)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("qwen3-1.7b" if cuda else "cpu-small")
    args.tokens = args.tokens or (16384 if cuda else 1024)
    args.blocks = args.blocks or 2
    args.steps = args.steps or (200 if cuda else 50)
    args.threads = args.threads or (None if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = block_shapes(args.model)
    log(
        f"{args.model} x {args.blocks} blocks, T={args.tokens}, k={args.k_frac} d_in, r={args.rank}, {args.steps} steps"
    )
    layers, subs = build(shapes, args.blocks, args.k_frac, args.rank, args.device)
    subs_c = complement_where_smaller(subs)
    gen = torch.Generator(device=args.device).manual_seed(1)
    low = getattr(torch, args.train_dtype)
    xs = {
        n: torch.randn(args.tokens, m.in_features, generator=gen, device=args.device, dtype=low)
        for n, m in layers.items()
    }
    dys = {
        n: torch.randn(args.tokens, m.out_features, generator=gen, device=args.device, dtype=low)
        for n, m in layers.items()
    }
    variants: dict[str, Variant] = {"plain": Variant(layers, None, "float32", args)}
    resolved: dict[str, str] = {p: resolve_precision(p, args.device) for p in ("float32", "tf32", "bf16", "auto")}
    # the default (reprojection='step' for float32 weights: no anchors; complement bases where k > d_in/2)
    variants["fora auto, step (default)"] = Variant(layers, subs_c, resolved["auto"], args, reprojection="step")
    variants["fora auto, step, update-only"] = Variant(
        layers, subs_c, resolved["auto"], args, project_gradients=False, reprojection="step"
    )
    for prec in ("float32", "tf32", "bf16", "auto"):
        variants[f"fora {prec}, anchors"] = Variant(layers, subs, resolved[prec], args)
    variants["fora auto, anchors, offload_anchors"] = Variant(layers, subs, resolved["auto"], args, on_host=True)
    for prec in ("float32", "auto"):
        variants[f"fora {prec}, anchors, update-only"] = Variant(
            layers, subs, resolved[prec], args, project_gradients=False
        )
    log("variants built; timing")
    times = interleaved(
        {n: (lambda v=v: v.step(xs, dys)) for n, v in variants.items()}, repeats=args.steps - 1, warmup=1
    )
    mems = {n: memory(v.subs, layers) for n, v in variants.items() if v.subs is not None}  # with the anchors attached
    mem, mem_step = mems["fora float32, anchors"], mems["fora auto, step (default)"]
    rows, out = [], {}
    for n, v in variants.items():
        ratio, noise = ratio_stats(times[n], times["plain"])
        prec = n.split(" ", 1)[1].split(",")[0] if n != "plain" else "-"
        note = "" if prec in ("-", resolved.get(prec)) else f"runs {resolved[prec]}"
        if prec == "tf32" and not cuda:
            note = "runs float32 (CPUs have no TF32)"
        leak = v.leak(subs, 256) if v.subs is not None else float("nan")
        out[n] = {"median_s": med(times[n]), "noise": spread(times[n]), "ratio_to_plain": ratio, "ratio_noise": noise,
                  "resolved": resolved.get(prec, "-"), "leakage": leak}  # fmt: skip
        m = f"{mems[n]['pct_of_weights']:.1f}% / {mems[n]['pct_of_floor']:.0f}%" if v.subs is not None else "-"
        rows.append([n + (f" ({note})" if note else ""), med(times[n]) * 1e3, ratio, noise, m, leak])
    header = [
        "variant",
        "ms / step",
        "x plain",
        "ratio noise",
        "FORA memory: % weights / % floor",
        f"leakage after {args.steps} steps",
    ]
    table = md_table(header, rows)
    n_dist = len({id(s.basis) for s in subs.values()})
    table += (
        f"\n\n{args.model} shapes x {args.blocks} blocks ({len(subs)} layers, {n_dist} distinct inputs), T = {args.tokens} tokens,"
        f" {args.train_dtype} training GEMMs, k = {args.k_frac:g} d_in, r = {args.rank}, AdamW lr {args.lr:g} wd 0.1, {args.device},"
        f" {torch.get_num_threads()} threads. FORA memory with the anchors on the device {mem['bytes'] / 2**20:.1f} MiB ({mem['bytes_per_layer'] / 2**20:.2f} MiB"
        f" per layer; bases {mem['basis_bytes'] / 2**20:.1f}, anchors + U,S,V {mem['anchor_and_channel_bytes'] / 2**20:.1f}; floor"
        f" {mem['floor_bytes'] / 2**20:.1f}); without anchors (reprojection='step', the default for float32 weights)"
        f" {mem_step['bytes'] / 2**20:.1f} MiB. noise = (max - min) / median of the per-round ratios."
    )
    name = args.name or f"step_cost_{'cuda' if cuda else 'cpu'}"
    payload = {"args": vars(args), "shapes": shapes, "memory": mems, "variants": out, "environment": environment()}
    if cuda:
        payload["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    write(name, payload, table)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "variant",
                "resolved",
                "median_ms",
                "ratio_to_plain",
                "ratio_noise",
                "leakage",
                "fora_bytes",
                "pct_weights",
                "pct_floor",
            ]
        )
        for n, o in out.items():
            fora = n != "plain"
            w.writerow([n, o["resolved"], o["median_s"] * 1e3, o["ratio_to_plain"], o["ratio_noise"], o["leakage"],
                        *([mems[n]["bytes"], mems[n]["pct_of_weights"], mems[n]["pct_of_floor"]] if fora else [0, 0, 0])])  # fmt: skip


if __name__ == "__main__":
    main()
