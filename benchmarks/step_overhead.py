"""Optimizer-step overhead of FORA, next to its GEMM lower bound, with fast options and their leakage.

    python benchmarks/step_overhead.py            # CPU, ~5-10 min on 2 busy cores
    python benchmarks/step_overhead.py --quick    # smaller shapes, ~1 min

Per protected layer (``d_out x d_in``, basis k, channel r) FORA adds, per step,
``4 d_out d_in (k + r)`` flops for ``grad <- Pi(grad)`` and as much again for the post-step
``W <- W0 + Pi(W - W0)``. The lower bound is those GEMMs alone (``G [Q|V]`` then ``[GQ|U][Q^T;M]``),
timed on the same shapes. All timings are interleaved round-robin in one process; ratios are
medians of per-round ratios, noise = (max - min) / median over the rounds.

Leakage of an option = how far its output is from the feasible set S, measured against a float64
``Pi``: ``||P - Pi64(P)|| / ||G||`` for a projected gradient P, ``||D - Pi64(D)|| / ||W0||`` after a
re-projection (D = W - W0). Precision options are GPU options: TF32 and bf16-input GEMMs are
emulated on CPU by rounding every GEMM input (fp32 accumulation); "autocast bf16" is a real CPU
bf16 GEMM (AMX where present).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _bench import (
    environment,
    interleaved,
    load_before,
    log,
    md_table,
    med,
    pad_stack,
    project_many_,
    project_weights_many_,
    ratio_stats,
    spread,
    synthetic_layer,
    tiny_causal_lm,
    token_batches,
    write,
)
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.projection import project, project_weight_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.subspace import SubspaceConfig, estimate_subspaces
from fora_lightning.core.targets import find_targets
from fora_lightning.metrics import leakage

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN3_1_7B = {"q_proj": (2048, 2048), "k_proj": (1024, 2048), "up_proj": (6144, 2048), "down_proj": (2048, 6144)}
TOKENS_PER_STEP = 2048 * 8


# ----------------------------------------------------------------------------- precision emulation
def _tf32(x: Tensor) -> Tensor:
    """Round float32 to TF32 (10-bit mantissa, round to nearest, ties away) as tensor cores read it."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


class RoundedGemms(TorchFunctionMode):
    """Every GEMM (``@``, mm, bmm, addmm, baddbmm) reads its factors rounded to ``kind``: "tf32",
    "bf16" (fp32 accumulation and output) or "bf16x3" (split bf16: a_hi b_hi + a_hi b_lo + a_lo b_hi)."""

    GEMMS = {"matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_"}

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def _prod(self, a: Tensor, b: Tensor) -> Tensor:
        if self.kind == "tf32":
            return _tf32(a) @ _tf32(b)
        ah, bh = _bf16(a), _bf16(b)
        if self.kind == "bf16":
            return ah @ bh
        return ah @ bh + ah @ _bf16(b - bh) + _bf16(a - ah) @ bh

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in self.GEMMS or args[0].dtype != torch.float32:
            return func(*args, **kwargs)
        if name in ("matmul", "__matmul__", "mm", "bmm"):
            return self._prod(args[0], args[1])
        c, a, b = args[:3]
        p = self._prod(a, b)
        alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
        return c.mul_(beta).add_(p, alpha=alpha) if name.endswith("_") else beta * c + alpha * p


# ----------------------------------------------------------------------------- leakage against the dense reference
def grad_leak(project_fn: Callable[[Tensor], Tensor], layer: dict[str, Tensor], seed: int) -> float:
    g = torch.randn(layer["w0"].shape, generator=torch.Generator().manual_seed(seed))
    p = project_fn(g).double()
    return float((p - dense_pi(p, layer["q"], layer["u"], layer["v"])).norm() / g.norm())


def weight_leak(reproject_fn: Callable[[Tensor], None], layer: dict[str, Tensor], seed: int) -> float:
    """One step: W = W0 + D_prev (in S, 1e-2 ||W0||) + a raw step (1e-4 ||W0||), re-projected."""
    gen = torch.Generator().manual_seed(seed)
    w0 = layer["w0"]
    d_prev = dense_pi(torch.randn(w0.shape, generator=gen), layer["q"], layer["u"], layer["v"])
    d_prev *= 1e-2 * w0.double().norm() / d_prev.norm()
    step = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
    step *= 1e-4 * w0.double().norm() / step.norm()
    w = (w0.double() + d_prev + step).float()
    reproject_fn(w)
    d = w.double() - w0.double()
    return float((d - dense_pi(d, layer["q"], layer["u"], layer["v"])).norm() / w0.double().norm())


# ----------------------------------------------------------------------------- big shapes
def shape_benchmark(shapes: dict[str, tuple[int, int]], k_frac: float, r: int, repeats: int, before) -> dict:
    layers = {
        n: synthetic_layer(o, i, max(1, int(k_frac * i)), r, torch.Generator().manual_seed(seed))
        for seed, (n, (o, i)) in enumerate(shapes.items())
    }
    params = {n: torch.nn.Parameter(L["w0"].clone()) for n, L in layers.items()}
    gen = torch.Generator().manual_seed(123)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5, weight_decay=0.1, foreach=True)
    grads0 = {n: p.grad.clone() for n, p in params.items()}

    def reset_grads() -> None:
        for n, p in params.items():
            p.grad.copy_(grads0[n])

    def proj_grads(fn, basis_key: str = "q", complement: bool = False) -> None:
        for n, p in params.items():
            L = layers[n]
            p.grad.copy_(fn(p.grad, L[basis_key], L["u"], L["v"], complement=complement))

    def reproject(fn) -> None:
        for n, p in params.items():
            L = layers[n]
            fn(p.data, L["q"], L["a0"], L["u"], L["v"], L["b0"])

    bufs = {}
    for n, L in layers.items():
        d_out, d_in = L["w0"].shape
        kr = L["q"].shape[1] + r
        bufs[n] = (torch.randn(d_in, kr), torch.empty(d_out, kr), torch.randn(kr, d_in), torch.empty(d_out, d_in))

    def bound() -> None:
        for n, p in params.items():
            b, left, right, out = bufs[n]
            torch.mm(p.grad, b, out=left)
            torch.mm(left, right, out=out)

    def step() -> None:
        reset_grads()
        opt.step()

    variants: dict[str, Callable[[], None]] = {
        "adamw step": step,
        "GEMM bound (1 projection)": bound,
        "gradient": lambda: (reset_grads(), proj_grads(project), opt.step()),
        "update": lambda: (reset_grads(), proj_grads(project), opt.step(), reproject(project_weight_)),
        "update-only (Adam-NSCL)": lambda: (reset_grads(), opt.step(), reproject(project_weight_)),
    }
    if before is not None:
        variants["gradient [before]"] = lambda: (reset_grads(), proj_grads(before.project), opt.step())
        variants["update [before]"] = lambda: (
            reset_grads(),
            proj_grads(before.project),
            opt.step(),
            reproject(before.project_weight_),
        )

    def autocast_grad() -> None:
        reset_grads()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            proj_grads(project)
        opt.step()

    variants["gradient, autocast bf16 GEMMs"] = autocast_grad
    times = interleaved(variants, repeats)
    t_step = times["adamw step"]
    rows, out = (
        [],
        {
            "k_frac": k_frac,
            "r": r,
            "shapes": shapes,
            "ks": {n: L["q"].shape[1] for n, L in layers.items()},
            "variants": {},
        },
    )
    flops1 = sum(4 * L["w0"].numel() * (L["q"].shape[1] + r) for L in layers.values())
    for name, ts in times.items():
        ratio, noise = ratio_stats(ts, t_step)
        over = [a - b for a, b in zip(ts, t_step)]
        n_proj = 2 if name.startswith("update [") or name == "update" else 1
        vs_bound = (
            med(over) / (n_proj * med(times["GEMM bound (1 projection)"]))
            if name not in ("adamw step", "GEMM bound (1 projection)")
            else float("nan")
        )
        out["variants"][name] = {
            "median_s": med(ts),
            "noise": spread(ts),
            "ratio_to_step": ratio,
            "ratio_noise": noise,
            "overhead_over_bound": vs_bound,
        }
        rows.append([name, med(ts) * 1e3, ratio, noise, vs_bound])
    gflops = flops1 / med(times["GEMM bound (1 projection)"]) / 1e9
    out["bound_gflops"] = gflops
    table = md_table(["variant", "ms / step", "x AdamW step", "noise", "FORA overhead / GEMM bound"], rows)
    return {"table": table, "result": out}


def complement_benchmark(shapes: dict[str, tuple[int, int]], k_frac: float, r: int, repeats: int) -> dict:
    """Gradient projection with Q (k = k_frac d_in) against its complement basis (d_in - k columns)."""
    layers = {
        n: synthetic_layer(o, i, int(k_frac * i), r, torch.Generator().manual_seed(seed))
        for seed, (n, (o, i)) in enumerate(shapes.items())
    }
    grads = {n: torch.randn(L["w0"].shape) for n, L in layers.items()}
    fns = {
        "Q": lambda: [project(grads[n], L["q"], L["u"], L["v"]) for n, L in layers.items()],
        "complement": lambda: [project(grads[n], L["c"], L["u"], L["v"], complement=True) for n, L in layers.items()],
    }
    times = interleaved(fns, repeats)
    ratio, noise = ratio_stats(times["complement"], times["Q"])
    return {
        "k_frac": k_frac,
        "Q_s": med(times["Q"]),
        "complement_s": med(times["complement"]),
        "ratio": ratio,
        "noise": noise,
    }


def leakage_table(d_out: int, d_in: int, k: int, r: int) -> tuple[str, dict]:
    L = synthetic_layer(d_out, d_in, k, r, torch.Generator().manual_seed(7))

    def grad_fn(mode: str | None, basis: str = "q") -> Callable[[Tensor], Tensor]:
        def fn(g: Tensor) -> Tensor:
            if mode == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return project(g, L[basis], L["u"], L["v"], complement=basis == "c")
            if mode is None:
                return project(g, L[basis], L["u"], L["v"], complement=basis == "c")
            with RoundedGemms(mode):
                return project(g, L[basis], L["u"], L["v"], complement=basis == "c")

        return fn

    def weight_fn(mode: str | None) -> Callable[[Tensor], None]:
        def fn(w: Tensor) -> None:
            if mode == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    project_weight_(w, L["q"], L["a0"], L["u"], L["v"], L["b0"])
            elif mode is None:
                project_weight_(w, L["q"], L["a0"], L["u"], L["v"], L["b0"])
            else:
                with RoundedGemms(mode):
                    project_weight_(w, L["q"], L["a0"], L["u"], L["v"], L["b0"])

        return fn

    rows, res = [], {}
    for label, mode in [
        ("float32 exact", None),
        ("TF32 (emulated)", "tf32"),
        ("bf16 inputs, fp32 acc. (emulated)", "bf16"),
        ("split bf16 x3 (emulated)", "bf16x3"),
        ("autocast bf16 (real CPU bf16)", "autocast"),
    ]:
        gl = max(grad_leak(grad_fn(mode), L, s) for s in range(3))
        cl = max(grad_leak(grad_fn(mode, "c"), L, s) for s in range(3)) if mode is None else float("nan")
        wl = max(weight_leak(weight_fn(mode), L, s) for s in range(3))
        res[label] = {"grad_leak": gl, "complement_grad_leak": cl, "weight_leak": wl}
        rows.append([label, gl, wl])
    rows.append(["float32 exact, complement basis", res["float32 exact"]["complement_grad_leak"], "n/a (needs Q)"])
    table = md_table(
        ["GEMM precision", "gradient: ||P - Pi(P)|| / ||G||", "re-projection: ||D - Pi(D)|| / ||W0||"], rows
    )
    return table, res


# ----------------------------------------------------------------------------- tiny model, end to end
def tiny_model_benchmark(hidden: int, n_layers: int, repeats: int, train_steps: int, before) -> tuple[str, dict]:
    vocab = 512
    model = tiny_causal_lm(hidden, n_layers, vocab=vocab)
    targets = find_targets(model, list(TARGETS))
    calib = token_batches(4, 8, 128, vocab, seed=1)
    cov = collect_covariances(model, targets, calib, lambda b: model(**b))
    subs = estimate_subspaces({n: m.weight.detach() for n, m in targets.items()}, SubspaceConfig(), cov)
    for n, s in subs.items():
        s.attach_anchors(targets[n].weight)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in targets.values()]
    for w in weights:
        w.requires_grad_(True)
    batch = token_batches(1, 8, 128, vocab, seed=2)[0]
    init_state = copy.deepcopy(model.state_dict())

    groups: dict[tuple, list[str]] = {}
    for n, s in subs.items():
        groups.setdefault((s.d_out, s.d_in, s.r), []).append(n)
    stacked = {
        key: {
            "basis": pad_stack([subs[n].basis for n in names]),
            "a0": pad_stack([subs[n].anchor_q for n in names]),
            "u": torch.stack([subs[n].u for n in names]),
            "v": torch.stack([subs[n].v for n in names]),
            "b0": torch.stack([subs[n].anchor_u for n in names]),
        }
        for key, names in groups.items()
    }

    def proj_grads(fn=project) -> None:
        for n, m in targets.items():
            s = subs[n]
            m.weight.grad.copy_(fn(m.weight.grad, s.basis, s.u, s.v, complement=s.complement))

    def reproject(fn=project_weight_) -> None:
        for n, m in targets.items():
            s = subs[n]
            fn(m.weight.data, s.basis, s.anchor_q, s.u, s.v, s.anchor_u)

    def proj_grads_batched() -> None:
        for key, names in groups.items():
            st = stacked[key]
            project_many_([targets[n].weight.grad for n in names], st["basis"], st["u"], st["v"])

    def reproject_batched() -> None:
        for key, names in groups.items():
            st = stacked[key]
            project_weights_many_(
                [targets[n].weight.data for n in names], st["basis"], st["a0"], st["u"], st["v"], st["b0"]
            )

    modes: dict[str, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {
        "none": (None, None),
        "gradient": (proj_grads, None),
        "update": (proj_grads, reproject),
        "update, batched by shape": (proj_grads_batched, reproject_batched),
        "update-only (Adam-NSCL)": (None, reproject),
    }
    if before is not None:
        modes["update [before]"] = (lambda: proj_grads(before.project), lambda: reproject(before.project_weight_))

    def new_opt() -> torch.optim.Optimizer:
        return torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.1, foreach=True)

    opt = new_opt()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads0 = [w.grad.clone() for w in weights]

    def opt_only(pre, post) -> Callable[[], None]:
        def fn() -> None:
            for w, g in zip(weights, grads0):
                w.grad.copy_(g)
            if pre:
                pre()
            opt.step()
            if post:
                post()

        return fn

    def train_step(pre, post) -> Callable[[], None]:
        def fn() -> None:
            opt.zero_grad(set_to_none=False)
            model(**batch, labels=batch["input_ids"]).loss.backward()
            if pre:
                pre()
            opt.step()
            if post:
                post()

        return fn

    log("tiny: optimizer step")
    t_opt = interleaved({m: opt_only(*fs) for m, fs in modes.items()}, repeats * 2, warmup=2)
    log("tiny: train step")
    t_train = interleaved({m: train_step(*fs) for m, fs in modes.items()}, repeats, warmup=1)

    # leakage after a short AdamW run per mode, on held-out calibration-like inputs
    model.load_state_dict(init_state)  # held-out inputs of the base model, not of the timed steps
    held = token_batches(1, 4, 128, vocab, seed=9)[0]
    xs: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: xs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).double()))
        for n, m in targets.items()
    ]
    with torch.no_grad():
        model(**held)
    for h in hooks:
        h.remove()
    task = token_batches(train_steps, 4, 64, vocab, seed=5)
    leaks = {}
    log("tiny: leakage runs")
    for mode, (pre, post) in modes.items():
        model.load_state_dict(init_state)
        o = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.1, foreach=True)
        for b in task:
            o.zero_grad(set_to_none=False)
            model(**b, labels=b["input_ids"]).loss.backward()
            if pre:
                pre()
            o.step()
            if post:
                post()
        per_layer = []
        for n, m in targets.items():
            s = subs[n]
            w0 = init_state[n + ".weight"].double()
            d = m.weight.detach().double() - w0
            per_layer.append(leakage(d - dense_pi(d, s.basis, s.u, s.v), w0, xs[n]))
        leaks[mode] = {"max": max(per_layer), "median": sorted(per_layer)[len(per_layer) // 2]}
    model.load_state_dict(init_state)

    rows, res = [], {"hidden": hidden, "layers": n_layers, "ks": {n: s.k for n, s in subs.items()}, "modes": {}}
    for mode in modes:
        r_opt, n_opt = ratio_stats(t_opt[mode], t_opt["none"])
        r_tr, n_tr = ratio_stats(t_train[mode], t_train["none"])
        res["modes"][mode] = {
            "opt_step_s": med(t_opt[mode]),
            "opt_ratio": r_opt,
            "opt_noise": n_opt,
            "train_step_s": med(t_train[mode]),
            "train_ratio": r_tr,
            "train_noise": n_tr,
            "leak": leaks[mode],
        }
        rows.append(
            [mode, med(t_opt[mode]) * 1e3, r_opt, n_opt, med(t_train[mode]) * 1e3, r_tr, n_tr, leaks[mode]["max"]]
        )
    table = md_table(
        [
            "mode",
            "opt step ms",
            "x AdamW step",
            "noise",
            "train step ms",
            "x train step",
            "noise",
            f"leak after {train_steps} steps (max layer)",
        ],
        rows,
    )
    return table, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shapes / 4, fewer repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k-frac", type=float, default=0.25, help="k = k_frac * d_in for the big shapes")
    ap.add_argument("--weight-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="1 is steadier on an oversubscribed machine")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = load_before("projection")
    scale = 4 if args.quick else 1
    shapes = {n: (o // scale, i // scale) for n, (o, i) in QWEN3_1_7B.items()}
    repeats = max(3, args.repeats // (2 if args.quick else 1))

    log("big shapes")
    big = shape_benchmark(shapes, args.k_frac, args.weight_rank, repeats, before)
    log("complement")
    no_down = {n: s for n, s in shapes.items() if n != "down_proj"}
    comp = [complement_benchmark(no_down, f, args.weight_rank, repeats) for f in (0.5, 0.75, 0.9)]
    log("leakage")
    leak_table, leak = leakage_table(
        shapes["q_proj"][0], shapes["q_proj"][1], int(args.k_frac * shapes["q_proj"][1]), args.weight_rank
    )
    log("tiny model")
    tiny_table, tiny = tiny_model_benchmark(128, 4, repeats, 12, before)

    ks = big["result"]["ks"]
    analytic = []
    for n, (o, i) in QWEN3_1_7B.items():
        k = int(args.k_frac * i) + args.weight_rank
        analytic.append([n, f"{o}x{i}", k, 4 * k / (3 * TOKENS_PER_STEP), 8 * k / (3 * TOKENS_PER_STEP)])
    analytic_table = md_table(
        ["layer", "shape", "k + r", f"gradient mode / train step flops (T={TOKENS_PER_STEP})", "update mode"], analytic
    )
    comp_table = md_table(
        ["k / d_in", "Q ms", "complement ms", "complement / Q", "noise"],
        [[c["k_frac"], c["Q_s"] * 1e3, c["complement_s"] * 1e3, c["ratio"], c["noise"]] for c in comp],
    )
    title = "Qwen3-1.7B layer shapes" + (" / 4 (--quick)" if args.quick else "")
    table = "\n\n".join(
        [
            f"### Optimizer step with FORA, {title}: {', '.join(f'{n} {o}x{i} (k={ks[n]})' for n, (o, i) in shapes.items())}, r={args.weight_rank}\n"
            f"GEMM bound throughput {big['result']['bound_gflops']:.0f} GFLOP/s; `[before]` = core/projection.py at {before and 'commit 5463e31'}.\n\n"
            + big["table"],
            "### Complement basis against Q, gradient projection only (q, k, up shapes)\n\n" + comp_table,
            f"### Leakage of the precision options ({shapes['q_proj'][0]}x{shapes['q_proj'][1]}, k={int(args.k_frac * shapes['q_proj'][1])}, r={args.weight_rank}; max of 3 draws)\n\n"
            + leak_table,
            "### Tiny Qwen3-architecture LM (hidden 128, 4 layers, 28 protected linears, energy 0.99, r=8), AdamW\n\n"
            + tiny_table,
            "### Analytic: FORA flops over training flops (6 T d_out d_in) for Qwen3-1.7B shapes at k = "
            f"{args.k_frac} d_in: 4(k+r)/(3T) per projection\n\n" + analytic_table,
        ]
    )
    payload = {
        "env": environment(),
        "args": vars(args),
        "big": big["result"],
        "complement": comp,
        "leakage": leak,
        "tiny": tiny,
    }
    if args.no_write:
        print(table)
    else:
        write("step_overhead" + ("_quick" if args.quick else ""), payload, table)


if __name__ == "__main__":
    main()
