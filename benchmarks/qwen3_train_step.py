"""A whole Qwen3-1.7B trained through a Lightning Trainer, with and without FORA: step time, peak memory, leakage.

    python benchmarks/qwen3_train_step.py --time-budget 390               # one CUDA GPU (~4-5 min on an H200)
    python benchmarks/qwen3_train_step.py --tiny --device cpu             # 2 layers, hidden 64, on CPU (< 1 min)

The model is built from its config (transformers ``Qwen3Config``: hidden 2048, intermediate 6144, 28 layers, 16
heads, 8 kv heads, head_dim 128, vocab 151936, tied embeddings; random weights, seed 0, no download) inside
:class:`~fora_lightning.CausalLMModule` (float32 master weights, AdamW, weight decay 0.1 on matrices, linear warm-up
then cosine), and trained on random tokens (fixed seeds) under ``precision="bf16-mixed"``, ``--micro-batch`` x
``--seq`` tokens per batch with ``accumulate_grad_batches=--accumulate`` (default 4 x 2048 x 2 = 16,384 tokens per
optimizer step). Variants, one after the other in this process (each model freed before the next is built):

- ``plain``: every parameter trains (``--plain-steps`` optimizer steps);
- ``FORA``: ``fora_lightning.FORA`` with every default (its targets, energy, ``weight_rank``, ``channel_bound``,
  ``precision``, ``freeze_other``...), calibrated on ``--calib-seqs`` random-token sequences (``--steps`` steps);
- ``plain, FORA's targets only``: plain training of the same trainable set as FORA (``freeze_other``: the seven
  projections of each block), run last and only when the time budget allows; FORA's step against the same step.

Measured per variant: median optimizer-step time after ``--warmup`` steps (a Callback timing
``on_train_batch_start`` .. ``on_train_batch_end`` of each step's batches, ``torch.cuda.synchronize`` at both ends;
FORA's gradient projection and post-step re-projection are inside), ``torch.cuda.max_memory_allocated`` during the
training steps and during fit start (model, optimizer, calibration, bases), and for FORA: its fit-start time
(``FORA.on_train_start``: calibration, eigendecompositions, anchors), its persistent state (each tensor held by
``FORA.subspaces`` counted once, device and host; also the device bytes its fit start left allocated), and the
leakage after the last step, per protected layer, on held-out inputs ``X`` (a random-token sequence not used for
calibration, ``--held-tokens`` positions, each layer's own input in the base model) projected onto span(Q):

    leakage = ||(W - W0) X_Q|| / ||W0 X_Q||,   without the channel: ||(W - W0 - U diag(delta) V^T) X_Q|| / ||W0 X_Q||

with ``delta = diag(U^T (W - W0) V)``; the first is bounded by ``channel_bound`` (the certified bound), the second is
the projection's numerical floor. ``W0 X_Q`` is computed in float64 before the first step and kept on the host (no
copy of ``W0``). ``--time-budget`` (seconds since start) ends the FORA run early, at an optimizer-step boundary, and
the leakage is reported at the step reached. Results: ``<out-dir>/qwen3_train_step_<cuda|cpu>.{json,md}``, rewritten
after each variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fora_lightning import FORA, CausalLMModule
from fora_lightning.core.targets import DEFAULT_TARGETS, find_targets

T0 = time.perf_counter()
RESULTS = Path(__file__).resolve().parent / "results"
QWEN3_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 512, "tie_word_embeddings": True,
        "max_position_embeddings": 256}  # fmt: skip
TRAIN_SEED, CALIB_SEED, HELD_SEED = 0, 1, 2


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since start."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak(device: torch.device) -> float:
    """``max_memory_allocated`` in GiB (NaN off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


class RandomTokens(Dataset):
    """``n`` sequences of ``seq`` uniform random tokens, each a function of ``(seed, index)``; labels = inputs."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int) -> None:
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab, (self.seq,), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` sequences as a list of label-free batches (what FORA calibrates on)."""
    ds = RandomTokens(n, seq, vocab, seed)
    return [{k: v for k, v in b.items() if k != "labels"} for b in DataLoader(ds, batch_size=batch, shuffle=False)]


# ----------------------------------------------------------------------------- FORA's state, read defensively
def subspace_tensors(sub: Any) -> dict[str, Tensor]:
    """A subspace's tensors by field name (``tensors()`` when it has one, else its tensor attributes)."""
    if callable(getattr(sub, "tensors", None)):
        return dict(sub.tensors())
    return {k: v for k, v in vars(sub).items() if isinstance(v, Tensor)}


def state_bytes(subspaces: dict[str, Any], device: torch.device) -> dict[str, float]:
    """FORA's persistent bytes: each storage once (q/k/v, gate/up share one basis), split into those on the
    training ``device`` and the rest (host memory; the spectrum, kept for inspection only, left out);
    ``nbytes_sum``: the API's per-layer ``nbytes()`` summed (a shared basis counted once per layer)."""
    seen: dict[tuple[str, int], int] = {}
    for sub in subspaces.values():
        for name, t in subspace_tensors(sub).items():
            if name != "spectrum":
                seen[(t.device.type, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    host = sum(b for (dev, _), b in seen.items() if dev != device.type)
    out = {"device_bytes": sum(seen.values()) - host, "host_bytes": host, "bytes": sum(seen.values())}
    try:
        out["nbytes_sum"] = sum(sub.nbytes() for sub in subspaces.values())
    except (AttributeError, TypeError):
        out["nbytes_sum"] = float("nan")
    return out


def span_q(sub: Any, x: Tensor) -> Tensor:
    """Rows of ``x`` projected onto span(Q): ``X Q Q^T``, or ``X - X C C^T`` when the subspace stores the complement C."""
    basis = sub.basis.to(x)
    inside = (x @ basis) @ basis.T
    return x - inside if getattr(sub, "complement", False) else inside


def channel(sub: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(U_r, S_r, V_r)`` in float64, or None when the subspace has no channel (r = 0) or does not expose it."""
    u, s, v = (getattr(sub, f, None) for f in ("u", "s", "v"))
    if not all(isinstance(t, Tensor) for t in (u, s, v)) or u.shape[-1] == 0:
        return None
    return u.to(device, torch.float64), s.to(device, torch.float64), v.to(device, torch.float64)


class HeldOut:
    """Each protected layer's held-out inputs projected onto span(Q), ``X_Q`` (float32, host), and ``W0 X_Q``
    (float64, host), taken once the bases exist and before the first step; :meth:`leakage` after training."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.x: dict[str, Tensor] = {}
        self.y0: dict[str, Tensor] = {}
        self.kept: dict[str, float] = {}  # ||X_Q|| / ||X||: the held-out inputs' share in span(Q)

    @torch.no_grad()
    def capture(
        self, trainer: Any, pl_module: Any, modules: dict[str, nn.Module], subspaces: dict[str, Any], batch: Any
    ) -> None:
        raw: dict[str, Tensor] = {}

        def keep(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                idx = torch.linspace(0, x.shape[0] - 1, min(self.tokens, x.shape[0]), device=x.device).long()
                raw[name] = x[idx].float()

            return hook

        handles = [modules[n].register_forward_pre_hook(keep(n)) for n in subspaces]
        forward = getattr(pl_module, "calibration_step", None) or (lambda b: pl_module(**b))
        try:
            with trainer.precision_plugin.forward_context():
                forward(trainer.strategy.batch_to_device(batch))
        finally:
            for h in handles:
                h.remove()
        for name, x in raw.items():
            self.add(name, x, subspaces[name], modules[name].weight)

    @torch.no_grad()
    def add(self, name: str, x: Tensor, sub: Any, w0: Tensor) -> None:
        """Keep ``X_Q`` (rows of ``x`` projected onto span(Q)) and ``W0 X_Q`` in float64, both on the host."""
        xq = span_q(sub, x.double()).float()
        self.x[name], self.y0[name] = xq.cpu(), (xq.double() @ w0.detach().double().T).cpu()
        self.kept[name] = float(xq.norm() / x.norm().clamp_min(1e-30))

    @torch.no_grad()
    def leakage(self, modules: dict[str, nn.Module], subspaces: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Per layer: ``leakage``, ``leakage_no_channel`` and ``delta_over_s`` (``max_i |delta_i| / S_i``)."""
        out = {}
        for name, x in self.x.items():
            w = modules[name].weight.detach()
            dev = w.device
            xq, y0, w = x.to(dev, torch.float64), self.y0[name].to(dev), w.double()
            diff = xq @ w.T - y0
            base = y0.norm().clamp_min(1e-30)
            row = {"leakage": float(diff.norm() / base), "leakage_no_channel": float("nan"), "delta_over_s": 0.0}
            uvs = channel(subspaces[name], dev)
            if uvs is not None:
                u, s, v = uvs
                delta = ((u.T @ w) * v.T).sum(1) - s  # diag(U^T W V) - S = diag(U^T (W - W0) V)
                row["leakage_no_channel"] = float((diff - ((xq @ v) * delta) @ u.T).norm() / base)
                row["delta_over_s"] = float((delta.abs() / s.clamp_min(1e-30)).max())
            elif getattr(subspaces[name], "r", 0) == 0:
                row["leakage_no_channel"] = row["leakage"]
            out[name] = row
        return out


# ----------------------------------------------------------------------------- callbacks
class Mark(Callback):
    """Placed before FORA: the time and the allocated device bytes when ``on_train_start`` begins."""

    t, allocated = 0.0, 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        sync(pl_module.device)
        self.t, self.allocated = time.perf_counter(), allocated(pl_module.device)


class Bench(Callback):
    """Placed after FORA: fit-start time and memory, the held-out capture (then the peak is reset), each optimizer
    step's time into ``run["step_s"]``, and the stop at ``deadline`` (at a step boundary)."""

    def __init__(
        self, run: dict[str, Any], mark: Mark, accumulate: int, deadline: float | None, fora: Any, held_batch: Any
    ) -> None:
        self.run, self.mark, self.accumulate, self.deadline, self.fora = run, mark, accumulate, deadline, fora
        self.held_batch, self.held, self.t0 = held_batch, None, 0.0
        if fora is not None:
            self.held = HeldOut(run["held_tokens"])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        dev = pl_module.device
        sync(dev)
        self.run["fit_start_s"] = time.perf_counter() - self.mark.t
        self.run["peak_fit_start_GiB"] = peak(dev)
        self.run["fit_start_allocated_bytes"] = allocated(dev) - self.mark.allocated
        if self.held is not None:
            subs, modules = self.fora.subspaces, dict(pl_module.named_modules())
            try:
                self.held.capture(trainer, pl_module, {n: modules[n] for n in subs}, subs, self.held_batch)
            except Exception as e:  # FORA's state changed shape: measure the rest, say why there is no leakage
                traceback.print_exc()
                self.run["leakage_error"], self.held = f"{type(e).__name__}: {e}", None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulate == 0:
            sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accumulate:
            return
        sync(pl_module.device)
        now = time.perf_counter()
        self.run["step_s"].append(now - self.t0)
        if self.deadline is not None and now > self.deadline and not trainer.should_stop:
            self.run["stopped_by_budget"] = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.run["peak_train_GiB"] = peak(pl_module.device)


# ----------------------------------------------------------------------------- one run
def run_variant(
    kind: str, args: argparse.Namespace, config: dict[str, Any], steps: int, deadline: float | None
) -> dict[str, Any]:
    """Build the model, train ``steps`` optimizer steps as ``kind`` (``plain``, ``fora``, ``plain_targets``), measure."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run: dict[str, Any] = {"kind": kind, "steps_planned": steps, "step_s": [], "stopped_by_budget": False,
                           "allocated_before_build_bytes": allocated(device), "held_tokens": args.held_tokens}  # fmt: skip
    vocab, seq = config["vocab_size"], args.seq
    mark, fora = Mark(), None
    if kind == "fora":
        fora = FORA(calibration=batches(args.calib_seqs, args.calib_batch, seq, vocab, CALIB_SEED))
    bench = Bench(run, mark, args.accumulate, deadline, fora, batches(1, 1, seq, vocab, HELD_SEED)[0])
    callbacks = [mark, fora, bench] if fora is not None else [mark, bench]
    trainer = pl.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="qwen3-train-step-"),
    )
    t = time.perf_counter()
    torch.manual_seed(0)
    with trainer.init_module():
        module = CausalLMModule(config={"model_type": "qwen3", **config}, lr=args.lr, weight_decay=0.1)
    sync(device)
    run["build_s"] = time.perf_counter() - t
    targets = find_targets(module, list(DEFAULT_TARGETS))
    run["protected_params"] = sum(m.weight.numel() for m in targets.values())
    run["model_params"] = sum(p.numel() for p in module.parameters())
    if kind == "plain_targets":
        keep = {id(m.weight) for m in targets.values()}
        for p in module.parameters():
            p.requires_grad_(id(p) in keep)
    data = DataLoader(
        RandomTokens(steps * args.accumulate * args.micro_batch, seq, vocab, TRAIN_SEED),
        batch_size=args.micro_batch,
        shuffle=False,
    )
    log(f"{kind}: built in {run['build_s']:.1f} s, training {steps} steps")
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=data)
    sync(device)
    run["fit_s"] = time.perf_counter() - t
    run["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    run["steps_done"] = trainer.global_step
    timed = run["step_s"][args.warmup :] or run["step_s"]
    run["median_step_s"] = statistics.median(timed) if timed else float("nan")
    if fora is not None:
        subs = dict(fora.subspaces)
        run["protected_params"] = sum(getattr(s, "d_out", 0) * getattr(s, "d_in", 0) for s in subs.values())
        run["fora_state"] = state_bytes(subs, device)
        run["fora_precision"] = str(getattr(fora, "precision", "?"))
        run["channel_bound"] = getattr(getattr(fora, "config", None), "channel_bound", None)
        ks = [(getattr(s, "k", 0), getattr(s, "d_in", 1)) for s in subs.values()]
        run["k_over_d_in_mean"] = statistics.fmean(k / d for k, d in ks) if ks else float("nan")
        modules = dict(module.named_modules())
        t = time.perf_counter()
        per_layer = bench.held.leakage({n: modules[n] for n in subs}, subs) if bench.held is not None else {}
        run["leakage_eval_s"] = time.perf_counter() - t
        run["leakage_per_layer"] = per_layer
        for key in ("leakage", "leakage_no_channel", "delta_over_s"):
            vals = [row[key] for row in per_layer.values() if not math.isnan(row[key])]
            run[f"{key}_max"] = max(vals, default=float("nan"))
            run[f"{key}_mean"] = statistics.fmean(vals) if vals else float("nan")
        kept = list(bench.held.kept.values()) if bench.held is not None else []
        run["held_out_share_in_span_q_mean"] = statistics.fmean(kept) if kept else float("nan")
    log(
        f"{kind}: {run['steps_done']} steps, median {run['median_step_s'] * 1e3:.1f} ms/step, "
        f"peak (steps) {run.get('peak_train_GiB', float('nan')):.2f} GiB"
        + (f", leakage max {run['leakage_max']:.3g}" if fora is not None else "")
    )
    return run


# ----------------------------------------------------------------------------- report
def versions(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "lightning": lightning.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version(),
                           "cuda_runtime": torch.version.cuda, "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_GiB=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def cell(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}".rstrip("0").rstrip(".")
    return str(x)


LABELS = {"plain": "plain (every parameter trains)", "fora": "FORA, every default",
          "plain_targets": "plain, FORA's targets only"}  # fmt: skip


def table(runs: dict[str, dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    """The markdown table and its notes."""
    header = ["variant", "trainable params (M)", "steps", "step ms (median)", "x plain", "x plain, same trainable",
              "peak GiB (steps)", "peak GiB (fit start)", "FORA state MiB (device + host)", "% of protected weights' fp32",
              "% of their AdamW training state", "fit-start s", "leakage max / mean", "without channel: max / mean"]  # fmt: skip
    base = runs.get("plain", {}).get("median_step_s", float("nan"))
    same = runs.get("plain_targets", {}).get("median_step_s", float("nan"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, r in runs.items():
        if "error" in r:
            lines.append(f"| {LABELS[kind]} | failed: {r['error'][:300]} |" + " |" * (len(header) - 2))
            continue
        ms = r["median_step_s"]
        row: list[Any] = [LABELS[kind], r["trainable_params"] / 1e6, r["steps_done"], ms * 1e3, ms / base]
        row.append(ms / same if kind != "plain" else float("nan"))
        row += [r.get("peak_train_GiB", float("nan")), r.get("peak_fit_start_GiB", float("nan"))]
        if kind == "fora":
            st, w = r["fora_state"], r["protected_params"]
            mib = f"{st['bytes'] / 2**20:.1f} ({st['device_bytes'] / 2**20:.1f} + {st['host_bytes'] / 2**20:.1f})"
            leak = f"{cell(r['leakage_max'])} / {cell(r['leakage_mean'])}"
            nc = f"{cell(r['leakage_no_channel_max'])} / {cell(r['leakage_no_channel_mean'])}"
            row += [mib, 100 * st["bytes"] / (4 * w), 100 * st["bytes"] / (16 * w), r["fit_start_s"], leak, nc]
        else:
            row += ["-"] * 6
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    tokens = args.micro_batch * args.seq * args.accumulate
    notes = [
        "",
        f"{args.model_name}, built from its config (random weights), {env.get('gpu', env.get('cpu'))}, "
        f"torch {env['torch']} (CUDA {env['cuda_runtime']}), lightning {env['lightning']}, transformers {env['transformers']}. "
        f"precision {args.precision}, {tokens:,} tokens per optimizer step ({args.micro_batch} x {args.seq} x "
        f"accumulate_grad_batches {args.accumulate}), random tokens; CausalLMModule's AdamW (lr {args.lr:g}, weight "
        f"decay 0.1, warm-up 3% then cosine). Step time: median over the steps after the first {args.warmup}.",
    ]
    fora = runs.get("fora")
    if fora is not None and "error" not in fora:
        st = fora["fora_state"]
        notes.append(
            f"FORA: calibrated on {args.calib_seqs} x {args.seq} random tokens (batches of {args.calib_batch}); "
            f"{fora['protected_params'] / 1e6:.1f} M protected weights ({len(fora['leakage_per_layer'])} layers), mean "
            f"k / d_in {fora['k_over_d_in_mean']:.3f}, per-step projections in {fora['fora_precision']}. State: each "
            f"tensor held by FORA.subspaces counted once (the per-layer nbytes() sum, shared bases counted per layer: "
            f"{st['nbytes_sum'] / 2**20:.1f} MiB; device bytes FORA's fit start left allocated: "
            f"{fora['fit_start_allocated_bytes'] / 2**20:.1f} MiB). Leakage after {fora['steps_done']} steps"
            f"{' (stopped by --time-budget)' if fora['stopped_by_budget'] else ''} on {args.held_tokens} held-out "
            f"positions per layer projected onto span(Q) (they keep {100 * fora['held_out_share_in_span_q_mean']:.1f}% of "
            f"the held-out inputs' norm, mean over layers); channel_bound {fora['channel_bound']}, max |delta_i| / S_i "
            f"{fora['delta_over_s_max']:.3g}."
            + (f" No leakage: {fora['leakage_error']}." if "leakage_error" in fora else "")
        )
    if env["device"].startswith("cuda"):
        before = ", ".join(f"{k} {r.get('allocated_before_build_bytes', 0) / 2**20:.0f}" for k, r in runs.items())
        notes.append(f"Device memory still allocated when each run began (MiB; the peaks include it): {before}.")
    notes.append(f"Command: `{args.command}`")
    return "\n".join(lines) + "\n" + "\n\n".join(notes)


def write(out: Path, name: str, payload: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(md + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 Qwen3 (vocab 512) for CPU testing")
    p.add_argument("--steps", type=int, default=None, help="FORA's optimizer steps (default 200; tiny: 20)")
    p.add_argument(
        "--plain-steps", type=int, default=None, help="the plain runs' optimizer steps (default 20; tiny: 6)"
    )
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 3; tiny: 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny: 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per batch (default 4; tiny: 2)")
    p.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--calib-seqs", type=int, default=8, help="calibration sequences of --seq tokens")
    p.add_argument("--calib-batch", type=int, default=1, help="calibration sequences per batch")
    p.add_argument("--held-tokens", type=int, default=None, help="held-out positions per layer (default 512; tiny: 64)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds since start after which FORA's run stops")
    p.add_argument("--reserve", type=float, default=20.0, help="seconds kept back from --time-budget for the report")
    p.add_argument("--skip-plain-targets", action="store_true", help="leave out 'plain, FORA's targets only'")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default on CPU: 1, steadier on a shared machine)"
    )
    args = p.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.threads = args.threads or (1 if args.device == "cpu" else None)
    args.steps = args.steps or (20 if tiny else 200)
    args.plain_steps = args.plain_steps or (6 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.seq = args.seq or (64 if tiny else 2048)
    args.micro_batch = args.micro_batch or (2 if tiny else 4)
    args.held_tokens = args.held_tokens or (64 if tiny else 512)
    args.model_name = "tiny Qwen3 (2 layers, hidden 64)" if tiny else "Qwen3-1.7B"
    args.command = "python benchmarks/qwen3_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global T0
    T0 = time.perf_counter()  # --time-budget counts from here (also when main is called from a test)
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant in turn, the results rewritten after each."""
    device = torch.device(args.device)
    config = TINY if args.tiny else QWEN3_1_7B
    name = f"qwen3_train_step_{'cuda' if device.type == 'cuda' else 'cpu'}"
    env = versions(device)
    deadline = None if args.time_budget is None else T0 + args.time_budget - args.reserve
    runs: dict[str, dict[str, Any]] = {}
    plan = [("plain", args.plain_steps), ("fora", args.steps)]
    if not args.skip_plain_targets:
        plan.append(("plain_targets", args.plain_steps))
    log(f"{args.model_name} on {device}: {plan}")
    for kind, steps in plan:
        if kind == "plain_targets" and deadline is not None and "plain" in runs:
            need = runs["plain"].get("fit_s", 0.0) + runs["plain"].get("build_s", 0.0)
            if time.perf_counter() + 1.5 * need > deadline:
                log("plain, FORA's targets only: skipped (time budget)")
                break
        try:
            runs[kind] = run_variant(kind, args, config, steps, deadline if kind == "fora" else None)
        except Exception as e:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            log(f"{kind} failed: {type(e).__name__}: {e}")
            runs[kind] = {"kind": kind, "error": f"{type(e).__name__}: {e}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log(f"after {kind}: {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB still allocated")
        args_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"args": args_out, "config": config, "environment": env, "runs": runs}
        md = f"### {args.model_name}: a full training step with and without FORA\n\n" + table(runs, args, env)
        write(args.out_dir, name, payload, md)
    print(md)
    log(f"wrote {args.out_dir / name}.json and .md")
    return payload


if __name__ == "__main__":
    main()
