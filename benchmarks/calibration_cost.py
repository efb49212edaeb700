"""Calibration cost: FORA's covariance pass against a plain no_grad forward, each cheaper product
(panelled upper triangle, the activations' own GEMM dtype) with its
held-out quality, the analytic flop ratio at Qwen3-1.7B shapes, eigh/SVD time per layer size, and
(``--corda``) PEFT's CorDA preprocessing, in one process.

    python benchmarks/calibration_cost.py            # ~15 min on 2 busy CPU cores
    python benchmarks/calibration_cost.py --quick    # ~5 min: h=256 only, no eigh at 2048, no 6144 SVD
    python benchmarks/calibration_cost.py --big      # adds eigh at d = 6144 (minutes more)
    python benchmarks/calibration_cost.py --early-stop-only   # ~5 min: the early-stop rows alone

Goal (issue 13, goal 3): calibration <= 1.25x one no-grad forward over the same batches. Per token a
linear ``d_out x d_in`` costs ``2 d_out d_in`` flops in the forward and its input's ``x x^T`` adds
``2 d_in^2`` (once per distinct input: q/k/v and gate/up share one), times ``(b + 1) / (2b)`` with
panels. (The token-stride rows of the committed results were measured with ``covariance_token_stride``, a
setting removed since: not adopted.) The early stop (``calibration_early_stop``)
drops what runs after the last target's input: the last ``down_proj``, the final norm and the lm_head.
"""

from __future__ import annotations

import argparse
import inspect
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

from fora_lightning.config import PANEL_DEFAULT, PRODUCT_DEFAULT
from fora_lightning.core.covariance import Covariances, collect_covariances
from fora_lightning.core.energy import captured_energy, energy_rank
from fora_lightning.core.gram import flop_fraction, gram_
from fora_lightning.core.subspace import spectrum, weight_triplets
from fora_lightning.core.targets import find_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN3_1_7B = {"hidden": 2048, "ff": 6144, "layers": 28, "q": 16 * 128, "kv": 8 * 128, "vocab": 151936}
DEFAULT = {"panel": PANEL_DEFAULT, "product": PRODUCT_DEFAULT}
TODAY = {"panel": 0, "product": "accumulator"}


def analytic_ratio(shapes: dict, seq: int, panel: int = 0, early_stop: bool = False) -> float:
    """(forward + covariance flops) / forward flops per token: linears, attention scores, lm_head; with
    ``early_stop`` the pass skips the lm_head ``2 d V`` and the last down_proj ``2 f d`` (steady state).

    Inputs (width, owner's d_out): q/k/v (d, q), o (q, d), gate/up (d, f), down (f, d); the covariance of width w costs 2 w^2 per token.
    """
    d, f, q, kv = shapes["hidden"], shapes["ff"], shapes["q"], shapes["kv"]
    fwd_block = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 2 * 2 * seq * q  # linears + QK^T, AV (causal avg ~ seq)
    cov_block = sum(2 * w * w * flop_fraction(w, panel) for w in (d, q, d, f))
    fwd = shapes["layers"] * fwd_block + 2 * d * shapes["vocab"]
    skipped = 2 * d * shapes["vocab"] + 2 * f * d if early_stop else 0
    return (fwd - skipped + shapes["layers"] * cov_block) / fwd


def shapes_of(model: torch.nn.Module) -> dict:
    c = model.config
    hd = c.head_dim
    return {
        "hidden": c.hidden_size,
        "ff": c.intermediate_size,
        "layers": c.num_hidden_layers,
        "q": c.num_attention_heads * hd,
        "kv": c.num_key_value_heads * hd,
        "vocab": c.vocab_size,
    }


def text_batches(modules: list[str], n_batches: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Byte-level token batches from the source text of stdlib modules: real, strongly correlated sequences."""
    import importlib

    data = b"".join(inspect.getsource(importlib.import_module(m)).encode() for m in modules)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    need = n_batches * batch * seq
    ids = ids.repeat(-(-need // ids.numel()))[:need].reshape(n_batches, batch, seq)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def quality(cov: Covariances, held: Covariances, energy: float = 0.99) -> dict:
    """Per distinct input: k at ``energy`` and the held-out captured energy ``tr(Q^T C_h Q) / tr(C_h)``."""
    ks, held_energy = {}, {}
    for o in cov.sums:
        evals, evecs = spectrum(cov.covariance(o))
        k = energy_rank(evals, energy)
        ks[o], held_energy[o] = k, captured_energy(evecs[:, :k], held.covariance(o))
    e = list(held_energy.values())
    return {"k": ks, "k_total": sum(ks.values()), "held_energy": held_energy, "mean": sum(e) / len(e), "min": min(e)}


def variants(wide: int) -> dict[str, tuple[str, dict]]:
    """name -> (model dtype, collector settings); ``wide``: the widest input (panels narrower than it)."""
    out = {"today's pass (full float32 X^T X)": ("float32", TODAY)}
    for p in (256, 512, 1024):
        if p < wide:
            out[f"panel {p} (upper triangle)"] = ("float32", {**TODAY, "panel": p})
    out["default"] = ("float32", DEFAULT)
    out["bf16 model: today's pass (cast to float32)"] = ("bfloat16", TODAY)
    out["bf16 model: product in bf16"] = ("bfloat16", {**TODAY, "product": "input"})
    out["bf16 model: default"] = ("bfloat16", DEFAULT)
    return out


def pass_benchmark(hidden: int, layers: int, repeats: int, quality_batches: int) -> dict:
    """Every variant's pass time over the forward of the same model dtype, and its held-out quality."""
    vocab, seq = 2048, 256
    models = {"float32": tiny_causal_lm(hidden, layers, vocab=vocab)}
    models["bfloat16"] = tiny_causal_lm(hidden, layers, vocab=vocab).to(torch.bfloat16)
    targets = {k: find_targets(m, TARGETS) for k, m in models.items()}
    data = token_batches(4, 4, seq, vocab, seed=1, pad_frac=0.25)
    cases = variants(max(hidden, models["float32"].config.intermediate_size))

    def forward(dtype: str) -> None:
        with torch.no_grad():
            for b in data:
                models[dtype](**b)

    def cov(dtype: str, settings: dict, batches: list) -> Covariances:
        m = models[dtype]
        return collect_covariances(m, targets[dtype], batches, lambda b: m(**b), **settings)

    fns = {"no_grad forward (float32 model)": lambda: forward("float32")}
    fns["no_grad forward (bf16 model)"] = lambda: forward("bfloat16")
    for name, (dtype, settings) in cases.items():
        fns[name] = lambda dtype=dtype, settings=settings: cov(dtype, settings, data)
    times = interleaved(fns, repeats)
    # quality: more tokens than the timing feed (tokens per dimension as a real calibration), held-out batches
    feeds = {
        "random tokens": (
            token_batches(quality_batches, 4, seq, vocab, seed=2, pad_frac=0.25),
            token_batches(4, 4, seq, vocab, seed=3),
        ),
        "byte text": (
            text_batches(["argparse", "dataclasses", "typing"], quality_batches, 4, seq),
            text_batches(["statistics", "textwrap", "fractions"], 4, 4, seq),
        ),
    }
    out: dict = {"hidden": hidden, "layers": layers, "tokens": int(sum(b["attention_mask"].sum() for b in data))}
    out["analytic"] = {n: analytic_ratio(shapes_of(models["float32"]), seq, s["panel"]) for n, (_, s) in cases.items()}
    out["variants"] = {}
    for name, ts in times.items():
        dtype = "bfloat16" if "bf16" in name else "float32"
        base = times[f"no_grad forward ({'bf16' if dtype == 'bfloat16' else 'float32'} model)"]
        r, noise = ratio_stats(ts, base)
        out["variants"][name] = {"median_s": med(ts), "ratio_to_forward": r, "ratio_noise": noise, "quality": {}}
    for feed, (calib, held) in feeds.items():
        log(f"quality h={hidden} {feed}")
        refs = {dt: cov(dt, TODAY, held) for dt in models}
        for name, (dtype, settings) in cases.items():
            out["variants"][name]["quality"][feed] = quality(cov(dtype, settings, calib), refs[dtype])
    return out


EARLY_STOP_CASES = {
    "today's default pass": {**DEFAULT, "stop_early": False},
    "+ early stop": {**DEFAULT, "stop_early": True},
    "+ early stop, panel 256": {**DEFAULT, "panel": 256, "stop_early": True},
}


def early_stop_benchmark(repeats: int, n_batches: int = 8) -> dict:
    """The default pass with and without the early stop on Qwen3-1.7B scaled by 1/8 in every width (hidden 256,
    d_ff 768, vocab 18,992, T = 256, 28 layers: the same lm_head-to-block and attention-to-linear flop ratios),
    float32 and bf16 models; ``n_batches`` of 2 x 256 tokens, the first of them the early stop's reference (whole)."""
    scaled = {"hidden": 256, "ff": 768, "layers": 28, "vocab": QWEN3_1_7B["vocab"] // 8}
    models = {"float32": tiny_causal_lm(256, 28, vocab=scaled["vocab"])}
    models["bf16"] = tiny_causal_lm(256, 28, vocab=scaled["vocab"]).to(torch.bfloat16)
    targets = {k: find_targets(m, TARGETS) for k, m in models.items()}
    data = token_batches(n_batches, 2, 256, scaled["vocab"], seed=1)

    def forward(dtype: str) -> None:
        with torch.no_grad():
            for b in data:
                models[dtype](**b)

    fns = {f"{dt}: no_grad forward": (lambda dt=dt: forward(dt)) for dt in models}
    for dt, m in models.items():
        for name, settings in EARLY_STOP_CASES.items():
            fns[f"{dt}: {name}"] = lambda m=m, t=targets[dt], s=settings: collect_covariances(
                m, t, data, lambda b: m(**b), **s
            )
    log("early stop: 28-layer h=256 models")
    times = interleaved(fns, repeats)
    shapes = shapes_of(models["float32"])
    out: dict = {"shapes": shapes, "batches": n_batches, "tokens": n_batches * 2 * 256, "rows": []}
    for dt in models:
        for name, s in EARLY_STOP_CASES.items():
            r, noise = ratio_stats(times[f"{dt}: {name}"], times[f"{dt}: no_grad forward"])
            analytic = analytic_ratio(shapes, 256, s["panel"], s["stop_early"])
            out["rows"].append({"model": dt, "job": name, "ratio": r, "noise": noise, "analytic": analytic})
    out["qwen3_1_7b"] = {
        n: analytic_ratio(QWEN3_1_7B, 2048, s["panel"], s["stop_early"]) for n, s in EARLY_STOP_CASES.items()
    }
    return out


def early_stop_section(res: dict) -> str:
    head = (
        f"### Early stop: the default pass over a no_grad forward, Qwen3-1.7B scaled 1/8 in width (28 layers, h 256, "
        f"d_ff 768, vocab {res['shapes']['vocab']:,}, {res['batches']} batches x 2 x 256 tokens, the first whole)\n\n"
    )
    t = md_table(
        ["model", "job", "x forward (measured)", "noise", "analytic flops x forward (steady state)"],
        [[r["model"], r["job"], r["ratio"], r["noise"], r["analytic"]] for r in res["rows"]],
    )
    q = md_table(
        ["job", "analytic x forward, Qwen3-1.7B, T = 2048 (attention scores included)"],
        [[n, v] for n, v in res["qwen3_1_7b"].items()],
    )
    return head + t + "\n\n" + q


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


def product_benchmark(widths: list[int], tokens: int, repeats: int) -> list[dict]:
    """One batch's ``X^T X`` alone (the model runs drown it in noise here): each panel and dtype over the full float32."""
    out = []
    for d in widths:
        log(f"product d={d}")
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(d))
        xb, acc = x.bfloat16(), torch.zeros(d, d)
        fns = {
            f"float32, panel {p}": (lambda p=p, acc=acc, x=x: gram_(acc, x, p)) for p in (0, 256, 512, 1024) if p < d
        }
        fns.update(
            {f"bf16 input, panel {p}": (lambda p=p, acc=acc, xb=xb: gram_(acc, xb, p, "input")) for p in (0, 512)}
        )
        times = interleaved(fns, repeats)
        for name, ts in times.items():
            r, noise = ratio_stats(ts, times["float32, panel 0"])
            p = int(name.rsplit(" ", 1)[1])
            out.append({"d": d, "job": name, "ratio": r, "noise": noise, "flop_fraction": flop_fraction(d, p)})
    return out


def corda_benchmark(hidden: int, repeats: int) -> dict:
    """FORA's pass and CorDA's, both fed one unpadded sequence per forward (CorDA's hook needs batch 1)."""
    model = tiny_causal_lm(hidden, 2, vocab=2048)
    targets = find_targets(model, TARGETS)
    data = token_batches(4, 4, 256, 2048, seed=1, pad_frac=0.25)
    rows = [b["input_ids"][i, : int(b["attention_mask"][i].sum())] for b in data for i in range(4)]
    row_batches = [{"input_ids": ids[None]} for ids in rows]

    def forward_rows() -> None:
        with torch.no_grad():
            for ids in rows:
                model(input_ids=ids[None])

    fns = {
        "no_grad forward, batch 1": forward_rows,
        "FORA covariance pass (default), batch 1": lambda: collect_covariances(
            model, targets, row_batches, lambda b: model(**b), **DEFAULT
        ),
        "CorDA covariance pass (batch 1)": lambda: corda_preprocess(model, rows, 8, True),
        "CorDA full preprocess (cov + inv + SVD)": lambda: corda_preprocess(model, rows, 8, False),
    }
    times = interleaved(fns, repeats)
    return {
        n: dict(zip(("ratio", "noise"), ratio_stats(t, times["no_grad forward, batch 1"]))) for n, t in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="1 is steadier on an oversubscribed machine")
    ap.add_argument("--big", action="store_true", help="also eigh at d = 6144 (minutes on CPU)")
    ap.add_argument("--corda", action="store_true", help="also PEFT's CorDA preprocessing (needs peft)")
    ap.add_argument("--early-stop-only", action="store_true", help="only the early-stop rows")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    res_stop = early_stop_benchmark(repeats)
    if args.early_stop_only:
        table = early_stop_section(res_stop)
        if args.no_write:
            print(table)
        else:
            write("calibration_early_stop", {"env": environment(), "args": vars(args), **res_stop}, table)
        return
    hiddens = [256] if args.quick else [256, 1024]
    res_models = []
    for h in hiddens:
        log(f"model h={h}")
        res_models.append(pass_benchmark(h, 2, repeats, 6 if args.quick else 16))
    rows = []
    for m in res_models:
        for name, v in m["variants"].items():
            q = v["quality"]
            cells = []
            for feed in ("random tokens", "byte text"):
                cells += [q[feed]["mean"], q[feed]["k_total"]] if q else ["", ""]
            rows.append(
                [f"h={m['hidden']}", name, v["ratio_to_forward"], v["ratio_noise"], m["analytic"].get(name, "")] + cells
            )
    qwen = {
        name: analytic_ratio(QWEN3_1_7B, 2048, s["panel"])
        for name, (_, s) in variants(QWEN3_1_7B["ff"]).items()
        if not name.startswith("bf16")
    }
    t1 = md_table(
        [
            "model",
            "job",
            "x forward (same model dtype)",
            "noise",
            "analytic flops x forward",
            "held-out energy, random tokens",
            "sum k, random tokens",
            "held-out energy, byte text",
            "sum k, byte text",
        ],
        rows,
    )
    res_prod = product_benchmark([1536, 3072] if args.quick else [1536, 3072, 6144], 2048, repeats + 2)
    payload_prod = res_prod
    t_p = md_table(
        ["d", "one batch's X^T X (2048 tokens)", "time / full float32", "noise", "flops / full"],
        [[r["d"], r["job"], r["ratio"], r["noise"], r["flop_fraction"]] for r in res_prod],
    )
    t_q = md_table(
        ["settings", "analytic (fwd + cov) / fwd flops, Qwen3-1.7B, T = 2048"], [[n, r] for n, r in qwen.items()]
    )
    sections = [
        "### Covariance pass against a plain no_grad forward (tiny Qwen3-architecture LMs, 2 layers, vocab 2048, "
        "4 batches x 4 x 256 tokens, 25% max right padding; quality: energy 0.99, bases from "
        f"{'6' if args.quick else '16'} calibration batches, captured energy on 4 held-out batches)\n\n" + t1,
        "### The product alone: one batch's X^T X per panel width and dtype (interleaved)\n\n" + t_p,
        "### Analytic flop ratio at Qwen3-1.7B shapes (28 layers, d 2048, d_ff 6144, vocab 151936)\n\n" + t_q,
        early_stop_section(res_stop),
    ]
    payload = {
        "env": environment(),
        "args": vars(args),
        "models": res_models,
        "qwen3_1_7b_analytic": qwen,
        "product": payload_prod,
        "early_stop": res_stop,
    }
    if args.corda:
        res_corda = corda_benchmark(256, repeats)
        payload["corda"] = res_corda
        t_c = md_table(
            ["job (h=256, one sequence per forward)", "x forward", "noise"],
            [[n, v["ratio"], v["noise"]] for n, v in res_corda.items()],
        )
        sections.append("### PEFT CorDA (KPM) against FORA, same feeding\n\n" + t_c)
    t0 = time.perf_counter()
    sizes = [256, 512, 1024] + ([] if args.quick else [2048]) + ([6144] if args.big else [])
    res_dec = decomposition_benchmark(sizes, repeats)
    svd_shapes = [(512, 512), (1024, 1024)] + ([] if args.quick else [(2048, 2048), (6144, 2048)])
    res_svd = svd_benchmark(svd_shapes, repeats, load_before("subspace"))
    payload["decompositions"], payload["svd"] = res_dec, res_svd
    sections.append(
        f"### Covariance eigendecomposition per layer size (decaying-spectrum covariance; {time.perf_counter() - t0:.0f} s with the SVDs)\n\n"
        + md_table(
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
    )
    sections.append(
        "### Top-8 singular triplets of W0 (`weight_triplets`): before/after, `[before]` = core/subspace.py at commit 5463e31\n\n"
        + md_table(
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
    )
    table = "\n\n".join(sections)
    if args.no_write:
        print(table)
    else:
        write("calibration_cost" + ("_quick" if args.quick else ""), payload, table)


if __name__ == "__main__":
    main()
