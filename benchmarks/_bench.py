"""Shared helpers for the benchmark scripts: interleaved timing, tiny models, results files."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fora_lightning.core.projection import anchors, project, project_weight_

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE_COMMIT = "5463e31"  # the core/ math before the issue-7 optimisations


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line on stderr with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (A B C, B C A, ...) so that load
    changes on a shared machine hit every variant alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            sync()
            t = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Noise: (max - min) / median of the repeats."""
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float]:
    """Median and (max-min)/median of the per-repeat ratios num_i / den_i (paired, same round)."""
    rs = [a / b for a, b in zip(num, den)]
    return statistics.median(rs), spread(rs)


def environment() -> dict[str, object]:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        )
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write(name: str, payload: dict, table: str) -> None:
    """``results/<name>.json`` and the human-readable ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {RESULTS / name}.json and .md")


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}".rstrip("0").rstrip(".")
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_before(module: str) -> types.ModuleType | None:
    """``fora_lightning/core/<module>.py`` as of ``BEFORE_COMMIT`` (for same-process before/after), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:fora_lightning/core/{module}.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(f"_before_{module}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, f"{BEFORE_COMMIT}:{module}.py", "exec"), mod.__dict__)
    return mod


def tiny_causal_lm(
    hidden: int = 64, layers: int = 2, intermediate: int | None = None, vocab: int = 512, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised Qwen3-architecture causal LM (GQA: kv heads = heads / 2)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(2, hidden // 32)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def token_batches(
    n_batches: int, batch: int, seq: int, vocab: int, seed: int, pad_frac: float = 0.0
) -> list[dict[str, torch.Tensor]]:
    """Random token batches with right padding on a ``pad_frac`` share of each row's tail (mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_frac > 0:
            lengths = seq - torch.randint(0, int(pad_frac * seq) + 1, (batch,), generator=gen)
            mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def synthetic_layer(
    d_out: int, d_in: int, k: int, r: int, gen: torch.Generator, device: str = "cpu"
) -> dict[str, Tensor]:
    """One random layer in float32: W0, Q (k columns of a random frame) and its complement C, orthonormal U and V
    (r columns), and the anchors ``A0 = W0 Q``, ``B0 = U^T W0``."""
    o, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, device=device))
    w0 = torch.randn(d_out, d_in, generator=gen, device=device) / d_in**0.5
    u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=gen, device=device))
    v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen, device=device))
    q, c = o[:, :k].contiguous(), o[:, k:].contiguous()
    a0, b0 = anchors(w0, q, u)
    return {"w0": w0, "q": q, "c": c, "u": u, "v": v, "a0": a0, "b0": b0}


# ----------------------------------------------------------------------------- batched by shape (benchmark only)
def pad_stack(frames: Sequence[Tensor]) -> Tensor:
    """Stack ``n x k_i`` frames (bases ``Q_i`` or anchors ``A0_i = W0_i Q_i``) as ``L x n x max_i k_i``.

    The zero columns added are harmless: ``Q Q^T`` and ``(W Q - A0) Q^T`` do not change.
    """
    k = max(f.shape[-1] for f in frames)
    return torch.stack([torch.nn.functional.pad(f, (0, k - f.shape[-1])) for f in frames])


@torch.no_grad()
def project_many_(grads: Sequence[Tensor], basis: Tensor, u: Tensor | None = None, v: Tensor | None = None) -> None:
    """In place ``G_i <- Pi_i(G_i)`` for ``L`` layers of equal shape, as one batched ``project``.

    ``basis`` is ``L x d_in x k`` (:func:`pad_stack`), ``u``/``v`` are ``L x d_out x r``/``L x d_in x r``.
    Costs one stacked copy of the gradients (``L d_out d_in`` floats) and saves ``~10 (L - 1)``
    kernel launches: it pays for many small layers, not for large ones.
    """
    out = project(torch.stack(list(grads)), basis, u, v)
    torch._foreach_copy_(list(grads), list(out.unbind(0)))


@torch.no_grad()
def project_weights_many_(
    weights: Sequence[Tensor], basis: Tensor, anchor_q: Tensor, u: Tensor, v: Tensor, anchor_u: Tensor
) -> None:
    """In place ``W_i <- W0_i + Pi_i(W_i - W0_i)`` for ``L`` equal-shape layers, as one batched
    ``project_weight_`` (stacked ``basis``/``anchor_q`` from :func:`pad_stack`, ``u``, ``v``, ``anchor_u``)."""
    w = torch.stack(list(weights))
    project_weight_(w, basis, anchor_q, u, v, anchor_u)
    torch._foreach_copy_(list(weights), list(w.unbind(0)))
