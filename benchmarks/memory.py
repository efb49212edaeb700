"""Memory FORA adds: persistent bases and anchors against the model's parameter bytes, and the peak
during calibration.

    python benchmarks/memory.py          # ~2 min on 2 CPU cores
    python benchmarks/memory.py --smollm2   # SmolLM2-135M shapes: device bytes with and without offload_anchors

Persistent, per protected layer ``d_out x d_in`` (float32, ``mode="update"``): ``Q`` (d_in x k, one
per distinct input: q/k/v and gate/up share it), ``A0 = W0 Q`` (d_out x k), ``U`` (d_out x r),
``V`` (d_in x r), ``B0 = U^T W0`` (r x d_in), ``S`` (r). ``mode="gradient"`` stores no anchors and,
when k > d_in / 2, the complement (d_in x (d_in - k)) instead of Q.

Peak during calibration: float32 sums ``d_in^2`` per distinct input, all alive at once (one pass
over the data), then the float64 eigendecompositions. Measured as the growth of the process's
peak RSS (``ru_maxrss``) in a fresh subprocess per job, over the same subprocess's forward-only peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from _bench import environment, md_table, tiny_causal_lm, token_batches, write

from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.subspace import (
    HOST_FIELDS,
    SubspaceConfig,
    complement_basis,
    estimate_subspaces,
    nbytes_summary,
)
from fora_lightning.core.targets import find_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen3-1.7B: 28 blocks, hidden 2048, 16 q heads / 8 kv heads of 128, d_ff 6144, vocab 151936 (tied)
QWEN3 = {"blocks": 28, "d": 2048, "q": 2048, "kv": 1024, "ff": 6144, "vocab": 151936, "params": 2_031_739_904}
QWEN3_LAYERS = {  # name: (d_out, d_in, input group)
    "q_proj": (2048, 2048, "attn_in"),
    "k_proj": (1024, 2048, "attn_in"),
    "v_proj": (1024, 2048, "attn_in"),
    "o_proj": (2048, 2048, "o_in"),
    "gate_proj": (6144, 2048, "mlp_in"),
    "up_proj": (6144, 2048, "mlp_in"),
    "down_proj": (2048, 6144, "down_in"),
}


def unique_bytes(subspaces: dict) -> int:
    """Bytes actually held: tensors shared between layers (one Q per distinct input) counted once."""
    seen: dict[int, int] = {}
    for s in subspaces.values():
        for n, t in s.tensors().items():
            if n != "spectrum":
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def per_layer_bytes(d_out: int, d_in: int, k: int, r: int, mode: str) -> tuple[int, int]:
    """(basis floats, other floats) of one layer; the basis is shared within an input group."""
    if mode == "update":
        return d_in * k, d_out * k + d_out * r + d_in * r + r * d_in + r
    return d_in * min(k, d_in - k), d_out * r + d_in * r + r


def qwen3_bytes(k_frac: dict[str, float], r: int, mode: str) -> int:
    """float32 bytes of FORA's persistent state on all 28 blocks of Qwen3-1.7B for per-group k / d_in."""
    total, bases = 0, {}
    for _name, (o, i, group) in QWEN3_LAYERS.items():
        k = round(k_frac[group] * i)
        basis, other = per_layer_bytes(o, i, k, r, mode)
        bases[group] = basis
        total += other
    return 4 * QWEN3["blocks"] * (total + sum(bases.values()))


def group_of(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return QWEN3_LAYERS[leaf][2]


def tiny_persistent(hidden: int, layers: int, energy: float, r: int) -> dict:
    vocab = 2048
    model = tiny_causal_lm(hidden, layers, vocab=vocab)
    targets = find_targets(model, TARGETS)
    data = token_batches(8, 4, 256, vocab, seed=1)
    cov = collect_covariances(model, targets, data, lambda b: model(**b))
    weights = {n: m.weight.detach() for n, m in targets.items()}
    out = {"hidden": hidden, "layers": layers, "energy": energy, "r": r}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    out["param_bytes"], out["target_weight_bytes"] = param_bytes, target_bytes
    for mode in ("update", "gradient"):
        subs = estimate_subspaces(
            weights, SubspaceConfig(energy=energy, weight_rank=r), cov, allow_complement=mode == "gradient"
        )
        if mode == "update":
            for n, s in subs.items():
                s.attach_anchors(targets[n].weight)
            fracs: dict[str, list[float]] = {}
            for n, s in subs.items():
                fracs.setdefault(group_of(n), []).append(s.k / s.d_in)
            out["k_frac"] = {g: sum(v) / len(v) for g, v in fracs.items()}
            analytic = 4 * sum(
                sum(per_layer_bytes(s.d_out, s.d_in, s.k, s.r, mode)[1:]) for s in subs.values()
            ) + 4 * sum({(cov.owner[n], s.k): s.d_in * s.k for n, s in subs.items()}.values())
            out["analytic_check"] = analytic
        out[mode] = {
            "unique_bytes": unique_bytes(subs),
            "nbytes_summary": nbytes_summary(subs),
            "fraction_of_params": unique_bytes(subs) / param_bytes,
        }
    return out


SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}  # fmt: skip


def device_bytes(subspaces: dict, host: bool) -> int:
    """Like :func:`unique_bytes`; ``host=False`` leaves out what ``offload_anchors`` keeps in host memory."""
    seen: dict[int, int] = {}
    for s in subspaces.values():
        for n, t in s.tensors().items():
            if n != "spectrum" and (host or not s.anchors_on_host or n not in HOST_FIELDS):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def smollm2(k_frac: float = 0.6, r: int = 8) -> tuple[dict, str]:
    """SmolLM2-135M's shapes (LlamaConfig, random weights, no download), layers 10-29 protected at k = k_frac d_in:
    FORA's device bytes with the anchors on the device (Q) and with ``offload_anchors`` (complement, host anchors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    targets = {
        n: m for n, m in find_targets(model, TARGETS).items() if 10 <= int(n.split(".layers.")[1].split(".")[0]) <= 29
    }
    cov = collect_covariances(
        model, targets, token_batches(2, 2, 128, SMOLLM2["vocab_size"], seed=1), lambda b: model(**b)
    )
    weights = {n: m.weight.detach() for n, m in targets.items()}
    ranks = {n: round(k_frac * w.shape[1]) for n, w in weights.items()}
    target_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = 4 * sum(
        {cov.owner[n]: min(k, weights[n].shape[1] - k) * weights[n].shape[1] for n, k in ranks.items()}.values()
    )
    out, rows = {"k_frac": k_frac, "r": r, "layers": len(targets), "target_bytes": target_bytes, "param_bytes": param_bytes,
                 "floor_bytes": floor}, []  # fmt: skip
    with_c = estimate_subspaces(weights, SubspaceConfig(rank=ranks, weight_rank=r), cov, allow_complement=True)
    qs = {id(s.basis): complement_basis(s.basis) for s in with_c.values()}  # the Q-form, one Q per input as estimated
    with_q = {n: replace(s, basis=qs[id(s.basis)], complement=False) for n, s in with_c.items()}
    for label, on_host, subs in (
        ("anchors on the device (default)", False, with_q),
        ("offload_anchors=True", True, with_c),
    ):
        shared: dict = {}
        for n, s in subs.items():
            s.attach_anchors(weights[n], on_host=on_host, shared=shared)
        dev, total = device_bytes(subs, host=False), device_bytes(subs, host=True)
        out[label] = {"device_bytes": dev, "host_bytes": total - dev}
        rows.append(
            [
                label,
                dev / 2**20,
                100 * dev / target_bytes,
                100 * dev / param_bytes,
                100 * dev / floor,
                (total - dev) / 2**20,
            ]
        )
    table = (
        f"### SmolLM2-135M shapes (LlamaConfig: hidden 576, intermediate 1536, 30 layers, 9 / 3 heads; random weights), "
        f"layers 10-29 ({len(targets)} linears) at k = {k_frac:g} d_in, r = {r}, float32\n\n"
        + md_table(["anchors", "device MiB", "% protected weights", "% model params", "% floor", "host MiB"], rows)
        + f"\n\nProtected weights {target_bytes / 2**20:.1f} MiB, model {param_bytes / 2**20:.1f} MiB; floor "
        f"min(k, d_in - k) x d_in float32 per distinct input = {floor / 2**20:.1f} MiB."
    )
    return out, table


def _child(job: str, hidden: int, layers: int) -> None:
    """Run in a subprocess: print the peak-RSS growth (bytes) of ``job`` over a forward-only pass."""
    torch.set_num_threads(2)
    vocab = 2048
    model = tiny_causal_lm(hidden, layers, vocab=vocab, intermediate=3 * hidden)
    targets = find_targets(model, TARGETS)
    data = token_batches(4, 4, 256, vocab, seed=1)
    with torch.no_grad():
        for b in data:
            model(**b)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cov = collect_covariances(model, targets, data, lambda b: model(**b))
    after_cov = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if job == "estimate":
        estimate_subspaces({n: m.weight.detach() for n, m in targets.items()}, SubspaceConfig(), cov)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cov_bytes = sum(t.numel() * t.element_size() for t in cov.sums.values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "cov_peak_growth": after_cov - base,
                "estimate_peak_growth": after - after_cov,
                "cov_bytes": cov_bytes,
                "param_bytes": param_bytes,
                "largest_d_in": max(m.in_features for m in targets.values()),
            }
        )
    )


def peak(hidden: int, layers: int) -> dict:
    here = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "estimate", str(hidden), str(layers)],
        cwd=here,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"hidden": hidden, "layers": layers, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--smollm2", action="store_true", help="only the SmolLM2-135M-shaped table: results/memory_smollm2.{json,md}"
    )
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if args.smollm2:
        torch.set_num_threads(1)
        payload, table = smollm2()
        write("memory_smollm2", {"env": environment(), **payload}, table)
        return
    torch.set_num_threads(2)
    tiny = [tiny_persistent(h, 2, 0.99, 8) for h in (64, 256)]
    peaks = [peak(h, L) for h, L in ((256, 2), (1024, 2), (1024, 4))]

    r = 8
    measured = tiny[-1]["k_frac"]
    sweeps = {"measured on random-init h=256 model (energy 0.99)": measured}
    for f in (0.05, 0.25, 0.5, 0.9):
        sweeps[f"k = {f} d_in everywhere"] = {g: f for g in ("attn_in", "o_in", "mlp_in", "down_in")}
    qwen_rows, qwen = [], {}
    bf16_params, fp32_params = 2 * QWEN3["params"], 4 * QWEN3["params"]
    for label, kf in sweeps.items():
        u, g = qwen3_bytes(kf, r, "update"), qwen3_bytes(kf, r, "gradient")
        qwen[label] = {"k_frac": kf, "update_bytes": u, "gradient_bytes": g}
        qwen_rows.append([label, u / 2**30, u / bf16_params, u / fp32_params, g / 2**30, g / fp32_params])
    d, ff = QWEN3["d"], QWEN3["ff"]
    cov_floats = QWEN3["blocks"] * (3 * d * d + ff * ff)
    qwen["calibration_covariances_bytes_fp32"] = 4 * cov_floats
    qwen["all_float64_eigenvectors_bytes"] = 8 * cov_floats

    t_tiny = md_table(
        [
            "model",
            "param MiB",
            "k/d_in by input (attn, o, mlp, down)",
            "update: MiB",
            "of param bytes",
            "gradient: MiB",
            "of param bytes",
            "nbytes_summary / held",
        ],
        [
            [
                f"h={t['hidden']}, {t['layers']} layers",
                t["param_bytes"] / 2**20,
                ", ".join(f"{t['k_frac'][g]:.2f}" for g in ("attn_in", "o_in", "mlp_in", "down_in")),
                t["update"]["unique_bytes"] / 2**20,
                t["update"]["fraction_of_params"],
                t["gradient"]["unique_bytes"] / 2**20,
                t["gradient"]["fraction_of_params"],
                t["update"]["nbytes_summary"] / t["update"]["unique_bytes"],
            ]
            for t in tiny
        ],
    )
    t_qwen = md_table(
        ["k assumption", "update: GiB", "/ bf16 params", "/ fp32 params", "gradient: GiB", "/ fp32 params"], qwen_rows
    )
    t_peak = md_table(
        [
            "model",
            "param MiB",
            "covariance sums MiB",
            "peak RSS growth, covariance pass MiB",
            "further peak growth, eigh+SVD MiB",
        ],
        [
            [
                f"h={p['hidden']}, {p['layers']} layers",
                p["param_bytes"] / 2**20,
                p["cov_bytes"] / 2**20,
                p["cov_peak_growth"] / 2**20,
                p["estimate_peak_growth"] / 2**20,
            ]
            for p in peaks
        ],
    )
    table = "\n\n".join(
        [
            "### Persistent bytes FORA adds, default settings (energy 0.99, r = 8), tiny random-init Qwen3-architecture LMs, "
            "8 x 4 x 256 random tokens\n\n" + t_tiny,
            "### Qwen3-1.7B (2.03 B parameters, 196 protected linears), analytic float32 bytes, r = 8\n\n"
            + t_qwen
            + f"\n\nCalibration on Qwen3-1.7B holds {4 * cov_floats / 2**30:.2f} GiB of float32 covariance sums "
            f"({4 * cov_floats / bf16_params:.2f}x the bf16 parameter bytes); all float64 spectra at once would add "
            f"{8 * cov_floats / 2**30:.2f} GiB of eigenvectors, so each is dropped once its layers' bases are built "
            f"(one process: one at a time; `spread_spectra` over W ranks: a rank's 1/W share plus one received).",
            "### Peak memory during calibration (fresh subprocess per model, ru_maxrss growth)\n\n" + t_peak,
        ]
    )
    payload = {"env": environment(), "tiny": tiny, "qwen3_1_7b": qwen, "peaks": peaks}
    if args.no_write:
        print(table)
    else:
        write("memory", payload, table)


if __name__ == "__main__":
    main()
