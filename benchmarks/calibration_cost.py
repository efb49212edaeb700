"""Calibration cost: FORA's covariance pass over a plain no_grad forward, eigh/SVD time per layer
size, and PEFT's CorDA preprocessing on the same tiny model and data, in one process.

    python benchmarks/calibration_cost.py            # ~10 min on 2 busy CPU cores
    python benchmarks/calibration_cost.py --quick    # ~4 min
    python benchmarks/calibration_cost.py --big      # adds eigh at d = 6144 (minutes more)

Goal (issue 7): covariance pass <= 1.3x the forward. Per token a linear ``d_out x d_in`` costs
``2 d_out d_in`` flops in the forward and its input's ``x x^T`` adds ``2 d_in^2`` (once per
distinct input: q/k/v and gate/up share one), so the floor is set by the model's shapes; the
table prints that analytic ratio beside the measured one.
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import (
    environment,
    interleaved,
    load_before,
    log,
    md_table,
    med,
    ratio_stats,
    spread,
    tiny_causal_lm,
    token_batches,
    write,
)

from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.energy import energy_rank
from fora_lightning.core.subspace import SubspaceConfig, estimate_subspaces, spectrum, weight_triplets
from fora_lightning.core.targets import find_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def analytic_ratio(model: torch.nn.Module, seq: int) -> float:
    """(forward + covariance flops) / forward flops per token: linears, attention scores, lm_head."""
    cfg = model.config
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    fwd_block = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 2 * 2 * seq * q  # linears + QK^T, AV (causal avg ~ seq)
    cov_block = 2 * (d * d + q * q + d * d + f * f)  # inputs of qkv, o, gate/up, down
    fwd = n * fwd_block + 2 * d * cfg.vocab_size
    return (fwd + n * cov_block) / fwd


def corda_preprocess(model: torch.nn.Module, rows: list[torch.Tensor], rank: int, covariance_only: bool) -> None:
    """PEFT's CorDA (KPM) preprocessing, fed one unpadded sequence per forward (its hook needs batch 1)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution, preprocess_corda

    cfg = LoraConfig(
        r=rank, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm")
    )

    def run_model() -> None:
        for ids in rows:
            model(input_ids=ids[None])

    if covariance_only:
        calib_cov_distribution(model, cfg, run_model, None, None)
    else:
        preprocess_corda(model, cfg, run_model=run_model)
    for m in model.modules():  # leave the model as found
        for attr in ("eigens", "covariance_matrix", "sample_count", "corda_method", "rank"):
            if hasattr(m, attr) and not isinstance(getattr(type(m), attr, None), property):
                delattr(m, attr)


def model_benchmark(
    hidden: int, layers: int, n_batches: int, batch: int, seq: int, repeats: int, with_corda: bool
) -> dict:
    vocab = 2048
    model = tiny_causal_lm(hidden, layers, vocab=vocab)
    targets = find_targets(model, TARGETS)
    data = token_batches(n_batches, batch, seq, vocab, seed=1, pad_frac=0.25)
    rows = [b["input_ids"][i, : int(b["attention_mask"][i].sum())] for b in data for i in range(batch)]
    weights = {n: m.weight.detach() for n, m in targets.items()}

    def forward() -> None:
        with torch.no_grad():
            for b in data:
                model(**b)

    def forward_rows() -> None:
        with torch.no_grad():
            for ids in rows:
                model(input_ids=ids[None])

    def cov(impl=collect_covariances, dtype=torch.float32, batches=None) -> object:
        return impl(model, targets, batches or data, lambda b: model(**b), dtype=dtype)

    row_batches = [{"input_ids": ids[None]} for ids in rows]
    fns = {
        "no_grad forward": forward,
        "covariance pass (float32)": cov,
        "covariance pass (float64 acc.)": lambda: cov(dtype=torch.float64),
        "covariance + eigh + SVD (full FORA calibration)": lambda: estimate_subspaces(weights, SubspaceConfig(), cov()),
    }
    if with_corda:
        fns["no_grad forward, batch 1 (CorDA's feeding)"] = forward_rows
        fns["FORA covariance pass, batch 1"] = lambda: cov(batches=row_batches)
        fns["CorDA covariance pass (batch 1)"] = lambda: corda_preprocess(model, rows, 8, True)
        fns["CorDA full preprocess (cov + inv + SVD)"] = lambda: corda_preprocess(model, rows, 8, False)
    times = interleaved(fns, repeats)
    base = times["no_grad forward"]
    base1 = times.get("no_grad forward, batch 1 (CorDA's feeding)")
    out = {
        "hidden": hidden,
        "layers": layers,
        "tokens": int(sum(b["attention_mask"].sum() for b in data)),
        "analytic_cov_over_forward": analytic_ratio(model, seq),
        "variants": {},
    }
    for name, ts in times.items():
        den = base1 if ("batch 1" in name or "CorDA" in name) and base1 is not None else base
        r, noise = ratio_stats(ts, den)
        out["variants"][name] = {"median_s": med(ts), "noise": spread(ts), "ratio_to_forward": r, "ratio_noise": noise}
    return out


def decomposition_benchmark(sizes: list[int], repeats: int) -> list[dict]:
    """eigh of a d x d covariance, float64 (as ``spectrum``) against float32, with the float32
    eigh's top-k (energy 0.99) subspace error."""
    out = []
    for d in sizes:
        gen = torch.Generator().manual_seed(d)
        feats = torch.randn(4 * d, d, generator=gen) * torch.logspace(0, -3, d) ** 0.5  # decaying spectrum
        c = (feats.T @ feats / feats.shape[0]).double()
        c32 = c.float()
        reps = repeats if d <= 2048 else 1
        log(f"eigh d={d}")
        times = interleaved(
            {"eigh float64": lambda c=c: spectrum(c), "eigh float32": lambda c32=c32: torch.linalg.eigh(c32)},
            reps,
            warmup=0 if d > 2048 else 1,
        )
        evals, evecs = spectrum(c)
        k = energy_rank(evals, 0.99)
        _, v32 = torch.linalg.eigh(c32)
        q64, q32 = evecs[:, :k], v32.flip(1)[:, :k].double()
        err = float(torch.linalg.matrix_norm(q64 @ q64.T - q32 @ q32.T, ord=2))
        out.append(
            {
                "d": d,
                "k_energy_0.99": k,
                "repeats": reps,
                **{n: med(t) for n, t in times.items()},
                "noise": max(spread(t) for t in times.values()),
                "float32_topk_subspace_error": err,
            }
        )
    return out


def svd_benchmark(shapes: list[tuple[int, int]], repeats: int, before) -> list[dict]:
    """Top-8 singular triplets of W0 (``weight_triplets``): the float64 Gram-eigh route against the
    full float64 SVD it replaced, with the largest projector difference between the two."""
    out = []
    for d_out, d_in in shapes:
        gen = torch.Generator().manual_seed(d_out + d_in)
        w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        reps = repeats if max(d_out, d_in) <= 2048 else 1
        log(f"svd {d_out}x{d_in}")
        fns = {"after": lambda w=w: weight_triplets(w, 8)}
        if before is not None:
            fns["before (full SVD)"] = lambda w=w: before.weight_triplets(w, 8)
        times = interleaved(fns, reps, warmup=0 if reps == 1 else 1)
        u, s, v = (t.double() for t in weight_triplets(w, 8))
        ur, sr, vhr = torch.linalg.svd(w.double(), full_matrices=False)
        err = max(
            float((u @ u.T - ur[:, :8] @ ur[:, :8].T).abs().max()), float((v @ v.T - vhr[:8].T @ vhr[:8]).abs().max())
        )
        row = {
            "shape": f"{d_out}x{d_in}",
            "repeats": reps,
            "after_s": med(times["after"]),
            "projector_max_diff": err,
            "s_rel_diff": float(((s - sr[:8]) / sr[:8]).abs().max()),
        }
        if before is not None:
            row["before_s"] = med(times["before (full SVD)"])
            row["speedup"], row["noise"] = ratio_stats(times["before (full SVD)"], times["after"])
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="1 is steadier on an oversubscribed machine")
    ap.add_argument("--big", action="store_true", help="also eigh at d = 6144 (minutes on CPU)")
    ap.add_argument("--no-corda", action="store_true", help="skip PEFT's CorDA (peft not installed)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before_sub = load_before("subspace")
    with_corda = not args.no_corda
    if with_corda:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed (pip install 'fora-lightning[peft]'): CorDA rows skipped")
            with_corda = False
    repeats = 3 if args.quick else args.repeats
    models = [(64, 2, True), (256, 2, True)] + ([] if args.quick else [(1024, 2, False)])
    res_models = []
    for h, L, corda in models:
        log(f"model h={h}")
        res_models.append(model_benchmark(h, L, 4, 4, 256, repeats, corda))
    sizes = [256, 512, 1024, 2048] + ([6144] if args.big else [])
    t0 = time.perf_counter()
    res_dec = decomposition_benchmark(sizes, repeats)
    svd_shapes = [(512, 512), (1024, 1024), (2048, 2048)] + ([] if args.quick else [(6144, 2048)])
    res_svd = svd_benchmark(svd_shapes, repeats, before_sub)
    rows = []
    for m in res_models:
        for name, v in m["variants"].items():
            rows.append([f"h={m['hidden']}", name, v["median_s"] * 1e3, v["ratio_to_forward"], v["ratio_noise"]])
    t1 = md_table(["model", "job", "ms", "x forward (same feeding)", "noise"], rows)
    t_an = md_table(
        ["model", "tokens", "analytic (fwd + cov) / fwd flops", "measured covariance pass / forward"],
        [
            [
                f"h={m['hidden']}, {m['layers']} layers",
                m["tokens"],
                m["analytic_cov_over_forward"],
                m["variants"]["covariance pass (float32)"]["ratio_to_forward"],
            ]
            for m in res_models
        ],
    )
    t2 = md_table(
        [
            "d",
            "k (energy 0.99)",
            "eigh float64 s",
            "eigh float32 s",
            "float64 / float32",
            "float32 top-k subspace error",
            "repeats",
        ],
        [
            [
                r["d"],
                r["k_energy_0.99"],
                r["eigh float64"],
                r["eigh float32"],
                r["eigh float64"] / r["eigh float32"],
                r["float32_topk_subspace_error"],
                r["repeats"],
            ]
            for r in res_dec
        ],
    )
    t3 = md_table(
        [
            "W0 shape",
            "before: full float64 SVD s",
            "after: float64 Gram eigh s",
            "speedup",
            "noise",
            "max projector diff",
            "max rel. S diff",
            "repeats",
        ],
        [
            [
                r["shape"],
                r.get("before_s", float("nan")),
                r["after_s"],
                r.get("speedup", float("nan")),
                r.get("noise", float("nan")),
                r["projector_max_diff"],
                r["s_rel_diff"],
                r["repeats"],
            ]
            for r in res_svd
        ],
    )
    table = "\n\n".join(
        [
            "### Calibration pass against a plain no_grad forward (tiny Qwen3-architecture LMs, 2 layers, vocab 2048, "
            "4 batches x 4 x 256 tokens, 25% max right padding)\n\n" + t1,
            "### Covariance pass: measured against the flop floor\n\n" + t_an,
            f"### Covariance eigendecomposition per layer size (decaying-spectrum covariance; {time.perf_counter() - t0:.0f} s with the SVDs)\n\n"
            + t2,
            "### Top-8 singular triplets of W0 (`weight_triplets`): before/after, `[before]` = core/subspace.py at commit 5463e31\n\n"
            + t3,
        ]
    )
    payload = {
        "env": environment(),
        "args": vars(args),
        "models": res_models,
        "decompositions": res_dec,
        "svd": res_svd,
    }
    if args.no_write:
        print(table)
    else:
        write("calibration_cost" + ("_quick" if args.quick else ""), payload, table)


if __name__ == "__main__":
    main()
