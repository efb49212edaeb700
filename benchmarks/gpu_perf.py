"""FORA step overhead and calibration cost on one GPU (written for an H200; < 5 min).

    python benchmarks/gpu_perf.py                          # CUDA: writes results/gpu_perf.{json,md}
    python benchmarks/gpu_perf.py --device cpu --scale 16  # smoke test of every code path on CPU

Exact path: float32 GEMMs with TF32 OFF (``torch.backends.cuda.matmul.allow_tf32 = False``), the
setting under which FORA's guarantee is stated. Fast options, each with its leakage beside its
speed (leakage = ``||P - Pi64(P)|| / ||G||`` for gradients, ``||D - Pi64(D)|| / ||W0||`` after a
re-projection, against a float64 ``Pi`` on the device): TF32 GEMMs, bf16 autocast GEMMs,
re-projection only (Adam-NSCL style), complement bases, one batched call per group of equal shapes.

Shapes: one Qwen3-1.7B block (q, k, v, o 2048-wide; gate, up, down with d_ff 6144) x ``--blocks``,
k = ``--k-frac`` d_in, r = 8. "Train step" is the block's linear GEMMs for T = 2048 x 8 tokens
(forward + both backward GEMMs, 6 T d_out d_in flops): a lower bound on a real step, so the
fraction printed is an upper bound on FORA's share.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _bench import (
    environment,
    interleaved,
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

from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.projection import project, project_weight_
from fora_lightning.core.reference import dense_pi
from fora_lightning.core.targets import find_targets

BLOCK = {
    "q_proj": (2048, 2048),
    "k_proj": (1024, 2048),
    "v_proj": (1024, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (6144, 2048),
    "up_proj": (6144, 2048),
    "down_proj": (2048, 6144),
}


class Precision:
    """Context for one GEMM precision: "fp32" (TF32 off), "tf32", "bf16" (autocast)."""

    def __init__(self, kind: str, device: str) -> None:
        self.kind, self.device = kind, device

    def __enter__(self) -> None:
        if self.device == "cuda":
            self._prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = self.kind == "tf32"
        self._ac = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.kind == "bf16")
        self._ac.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ac.__exit__(*exc)
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self._prev


def step_benchmark(args: argparse.Namespace, device: str) -> tuple[str, str, dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    s, r = args.scale, 8
    layers: dict[str, dict[str, Tensor]] = {}
    for b in range(args.blocks):
        for n, (o, i) in BLOCK.items():
            layers[f"{b}.{n}"] = synthetic_layer(o // s, i // s, int(args.k_frac * i // s), r, gen, device)
    params = {n: torch.nn.Parameter(L["w0"].clone()) for n, L in layers.items()}
    grads0 = {n: torch.randn(p.shape, generator=gen, device=device) * 1e-3 for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads0[n].clone()
    opt = torch.optim.AdamW(
        list(params.values()), lr=1e-5, weight_decay=0.1, **({"fused": True} if device == "cuda" else {"foreach": True})
    )

    groups: dict[tuple[int, int], list[str]] = {}
    for n, L in layers.items():
        groups.setdefault(tuple(L["w0"].shape), []).append(n)
    stacked = {
        key: {
            "q": pad_stack([layers[n]["q"] for n in names]),
            "a0": pad_stack([layers[n]["a0"] for n in names]),
            **{t: torch.stack([layers[n][t] for n in names]) for t in ("u", "v", "b0")},
        }
        for key, names in groups.items()
    }

    def reset() -> None:
        torch._foreach_copy_([p.grad for p in params.values()], list(grads0.values()))

    def grads(basis: str = "q") -> None:
        for n, p in params.items():
            L = layers[n]
            p.grad.copy_(project(p.grad, L[basis], L["u"], L["v"], complement=basis == "c"))

    def reproj() -> None:
        for n, p in params.items():
            L = layers[n]
            project_weight_(p.data, L["q"], L["a0"], L["u"], L["v"], L["b0"])

    def grads_batched() -> None:
        for key, names in groups.items():
            st = stacked[key]
            project_many_([params[n].grad for n in names], st["q"], st["u"], st["v"])

    def reproj_batched() -> None:
        for key, names in groups.items():
            st = stacked[key]
            project_weights_many_([params[n].data for n in names], st["q"], st["a0"], st["u"], st["v"], st["b0"])

    def in_precision(kind: str, *fns: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            reset()
            with Precision(kind, device):
                for f in fns:
                    f()

        return run

    tokens = 2048 * 8 // s
    xs = {n: torch.randn(tokens, L["w0"].shape[1], generator=gen, device=device) for n, L in layers.items()}
    gys = {n: torch.randn(tokens, L["w0"].shape[0], generator=gen, device=device) for n, L in layers.items()}

    def train_gemms() -> None:  # y = x W^T, dx = dy W, dW = dy^T x, in bf16 as a mixed-precision step runs them
        with torch.autocast(device, dtype=torch.bfloat16):
            for n, p in params.items():
                xs[n] @ p.data.T
                gys[n] @ p.data
                gys[n].T @ xs[n]

    kr = {n: L["q"].shape[1] + r for n, L in layers.items()}
    bound_bufs = {
        n: (torch.randn(L["w0"].shape[1], kr[n], device=device), torch.randn(kr[n], L["w0"].shape[1], device=device))
        for n, L in layers.items()
    }

    def bound() -> None:
        for n, p in params.items():
            a, b = bound_bufs[n]
            (p.grad @ a) @ b

    step = in_precision("fp32", opt.step)
    variants = {
        "adamw step (fused)": step,
        "GEMM bound, 1 projection, fp32": in_precision("fp32", bound),
        "gradient, fp32": in_precision("fp32", grads, opt.step),
        "update, fp32": in_precision("fp32", grads, opt.step, reproj),
        "update-only (Adam-NSCL), fp32": in_precision("fp32", opt.step, reproj),
        "update batched by shape, fp32": in_precision("fp32", grads_batched, opt.step, reproj_batched),
        "update, TF32": in_precision("tf32", grads, opt.step, reproj),
        "update, bf16 autocast": in_precision("bf16", grads, opt.step, reproj),
        "gradient, complement bases, fp32": in_precision("fp32", lambda: grads("c"), opt.step),
        f"train-step GEMMs bf16 (T={tokens})": train_gemms,
    }
    times = interleaved(variants, args.repeats, warmup=2)
    t_step = times["adamw step (fused)"]
    t_train = med(times[f"train-step GEMMs bf16 (T={tokens})"])
    t_bound = med(times["GEMM bound, 1 projection, fp32"])
    rows, res = [], {}
    for name, ts in times.items():
        ratio, noise = ratio_stats(ts, t_step)
        over = med([a - b for a, b in zip(ts, t_step)])
        n_proj = 2 if name.startswith("update") and "only" not in name else 1
        res[name] = {
            "median_s": med(ts),
            "noise": spread(ts),
            "x_step": ratio,
            "over_bound": over / (n_proj * t_bound),
            "fraction_of_train_step": over / t_train,
        }
        rows.append([name, med(ts) * 1e3, ratio, noise, res[name]["over_bound"], res[name]["fraction_of_train_step"]])
    table = md_table(
        ["variant", "ms", "x AdamW step", "noise", "FORA overhead / GEMM bound", "FORA overhead / train-step GEMMs"],
        rows,
    )

    # leakage on one 2048 x 2048 layer (scaled), real device arithmetic
    L = layers["0.q_proj"]
    g = torch.randn(L["w0"].shape, generator=gen, device=device)
    qv = (L["q"], L["u"], L["v"])
    d_prev = dense_pi(torch.randn(L["w0"].shape, generator=gen, device=device), *qv)
    d_prev *= 1e-2 * L["w0"].double().norm() / d_prev.norm()
    raw = torch.randn(L["w0"].shape, generator=gen, device=device, dtype=torch.float64)
    raw *= 1e-4 * L["w0"].double().norm() / raw.norm()
    leak_rows, leaks = [], {}
    for kind in ("fp32", "tf32", "bf16"):
        with Precision(kind, device):
            p = project(g, L["q"], L["u"], L["v"]).double()
            pc = project(g, L["c"], L["u"], L["v"], complement=True).double()
            w = (L["w0"].double() + d_prev + raw).float()
            project_weight_(w, L["q"], L["a0"], L["u"], L["v"], L["b0"])
        d = w.double() - L["w0"].double()
        leaks[kind] = {
            "grad": float((p - dense_pi(p, *qv)).norm() / g.norm()),
            "complement_grad": float((pc - dense_pi(pc, *qv)).norm() / g.norm()),
            "weight": float((d - dense_pi(d, *qv)).norm() / L["w0"].double().norm()),
        }
        leak_rows.append([kind, leaks[kind]["grad"], leaks[kind]["complement_grad"], leaks[kind]["weight"]])
    leak_table = md_table(
        ["GEMM precision", "gradient leak", "complement-basis gradient leak", "re-projection leak / ||W0||"], leak_rows
    )
    return table, leak_table, {"steps": res, "leakage": leaks, "train_step_gemms_s": t_train}


def calibration_benchmark(args: argparse.Namespace, device: str) -> tuple[str, dict]:
    hidden, n_layers, vocab = 2048 // args.scale, 4, 32768 // args.scale
    model = tiny_causal_lm(hidden, n_layers, vocab=vocab).to(device)
    targets = find_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    data = [
        {k: t.to(device) for k, t in b.items()}
        for b in token_batches(4, 8, 2048 // args.scale, vocab, seed=1, pad_frac=0.1)
    ]

    def forward() -> None:
        with torch.no_grad():
            for b in data:
                model(**b)

    def cov() -> None:
        collect_covariances(model, targets, data, lambda b: model(**b))

    with Precision("fp32", device):
        times = interleaved({"no_grad forward": forward, "covariance pass (float32)": cov}, args.repeats, warmup=1)
    ratio, noise = ratio_stats(times["covariance pass (float32)"], times["no_grad forward"])
    eig = {}
    for d in (2048 // args.scale, 6144 // args.scale):
        a = torch.randn(2 * d, d, device=device)
        c = a.T @ a / (2 * d)
        for dt in (torch.float64, torch.float32):
            cd = c.to(dt)
            torch.linalg.eigh(cd)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.linalg.eigh(cd)
            if device == "cuda":
                torch.cuda.synchronize()
            eig[f"{d} {str(dt).split('.')[-1]}"] = time.perf_counter() - t
    rows = [["covariance pass / forward", ratio, noise]] + [[f"eigh {k} (s)", v, ""] for k, v in eig.items()]
    return md_table(["measure", "value", "noise"], rows), {
        "cov_over_forward": ratio,
        "noise": noise,
        "eigh_s": eig,
        "forward_s": med(times["no_grad forward"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension (CPU smoke test: 16)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--k-frac", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --scale 16 for a smoke test")
    torch.manual_seed(0)
    log("step overhead")
    step_table, leak_table, step_res = step_benchmark(args, device)
    log("calibration")
    cal_table, cal_res = calibration_benchmark(args, device)
    log("done")
    env = environment()
    table = "\n\n".join(
        [
            f"### FORA step on {env['cuda'] or env['cpu']}: {args.blocks} Qwen3-1.7B blocks / {args.scale}, k = {args.k_frac} d_in, r = 8\n\n"
            + step_table,
            "### Leakage per GEMM precision (one q_proj-shaped layer, device arithmetic, float64 reference)\n\n"
            + leak_table,
            f"### Calibration: Qwen3-architecture LM hidden {2048 // args.scale}, 4 layers, 4 x 8 x {2048 // args.scale} tokens\n\n"
            + cal_table,
        ]
    )
    payload = {"env": env, "args": vars(args), "step": step_res, "calibration": cal_res}
    if args.no_write or device != "cuda":
        print(table)
    else:
        write("gpu_perf", payload, table)


if __name__ == "__main__":
    main()
