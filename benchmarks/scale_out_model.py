"""FORA's memory plan under FSDP2, analytic: every phase's per-rank peak for Llama-3-8B / 70B shapes, 8 to 512 GPUs.

    python benchmarks/scale_out_model.py        # results/scale_out_model.{json,md}; checks results/memory.json

Per protected layer ``d_out x d_in`` (the seven projections of every block), basis rank k, channel rank r = 8,
float32 throughout (FORA's defaults: ``reprojection='step'`` for float32 master weights, as FSDP2 mixed precision
keeps them). FORA's persistent state on rank ``i`` of W (``core/sharding.py`` ``Split``: ``torch.chunk`` rows):

    per distinct input (q/k/v share one, gate/up one):  rows_i(d_in) x min(k, d_in - k)     (the basis, or its complement)
    per layer:  rows_i(d_out) r (U) + rows_i(d_in) r (V) + rows_i(d_in) (spectrum) + 2 r (S, delta: whole)

Other phases, per rank:

- calibration sums: float32 ``d_in^2`` per distinct input; all at once (today) every block's, per group of
  blocks (the grouped calibration) one block's at the least, so ``L / G`` forwards for groups of G blocks;
- eigh: on the rank that owns an input, a float64 copy of its sums, the eigenvectors and LAPACK/cuSOLVER ``syevd``
  workspace (about ``2 d_in^2`` doubles): ``32 d_in^2`` bytes for the largest d_in, one at a time;
- step transient (``LayerwiseStep``): one layer's weight rows copied before its step, ``rows_i(d_out) d_in``, the
  input's basis all-gathered, ``d_in x min(k, d_in - k)``, and the step's coordinates in it,
  ``rows_i(d_out) x min(k, d_in - k)``, for the largest layer;
- communication per step: each input's basis all-gathered twice (gradient projection, step projection),
  ``(W - 1) / W`` of it received each time, and per layer two ring all-reduces of ``r x d_in`` (``U^T X``);
  next to FSDP2's own: bf16 parameters all-gathered for forward and backward and float32 gradients reduce-scattered,
  ``(2 + 2 + 4) P (W - 1) / W`` bytes.

Full fine-tune's per-rank training state: 16 bytes per parameter / W (FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` keeps the sharded parameters, their gradients and AdamW's two moments in float32; the bf16 copies
are per-unit transients); it "fits" an 80 GB GPU when that state is at most 80e9 bytes (activations not counted).
The same per-rank formula applied to the small Llama of ``memory.py`` a) is checked against its measured bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from _bench import RESULTS, md_table

from fora_lightning.core.sharding import chunk_range

GIB, R, GPU_BYTES, TOKENS = 2**30, 8, 80e9, 4 * 2**20
WORLDS = (8, 16, 32, 64, 128, 256, 512)
MODELS = {  # hidden, intermediate, blocks, heads, kv heads, head dim, parameters
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128, 8.03e9),
    "Llama-3-70B": (8192, 28672, 80, 64, 8, 128, 70.55e9),
}
K_FRACS = {"k = d_in/4": 0.25, "k = 0.6 d_in": 0.6}


def block_layers(h: int, ff: int, heads: int, kv: int, hd: int) -> dict[str, tuple[int, int, str]]:
    """One decoder block's projections: name -> (d_out, d_in, distinct input)."""
    return {"q_proj": (heads * hd, h, "attn_in"), "k_proj": (kv * hd, h, "attn_in"), "v_proj": (kv * hd, h, "attn_in"),
            "o_proj": (h, heads * hd, "o_in"), "gate_proj": (ff, h, "mlp_in"), "up_proj": (ff, h, "mlp_in"),
            "down_proj": (h, ff, "down_in")}  # fmt: skip


def rows(n: int, rank: int, world: int) -> int:
    lo, hi = chunk_range(n, rank, world)
    return hi - lo


def stored(k: int, d_in: int) -> int:
    """Columns of the stored basis: Q (k) or its complement (d_in - k) when k > d_in / 2."""
    return d_in - k if k > d_in / 2 else k


def persistent(layers: dict[str, tuple[int, int, int, int, str]], rank: int, world: int) -> dict[str, int]:
    """Rank ``rank``'s FORA bytes by field; ``layers``: name -> (d_out, d_in, k, r, input key)."""
    out = dict.fromkeys(("basis", "u", "v", "s", "delta", "spectrum"), 0)
    seen: set[str] = set()
    for d_out, d_in, k, r, key in layers.values():
        if key not in seen:
            seen.add(key)
            out["basis"] += 4 * rows(d_in, rank, world) * stored(k, d_in)
        out["u"] += 4 * rows(d_out, rank, world) * r
        out["v"] += 4 * rows(d_in, rank, world) * r
        out["spectrum"] += 4 * rows(d_in, rank, world)
        out["s"] += 4 * r
        out["delta"] += 4 * r
    return out


def model_rows(name: str, k_frac: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    h, ff, blocks, heads, kv, hd, params = MODELS[name]
    block = block_layers(h, ff, heads, kv, hd)
    inputs = {key: d_in for _, d_in, key in block.values()}
    layers = {f"{b}.{n}": (o, i, round(k_frac * i), R, f"{b}.{key}") for b in range(blocks) for n, (o, i, key) in block.items()}  # fmt: skip
    cols = {key: stored(round(k_frac * d), d) for key, d in inputs.items()}
    fixed = {
        "calibration_all_at_once_bytes": 4 * blocks * sum(d * d for d in inputs.values()),
        "calibration_one_block_bytes": 4 * sum(d * d for d in inputs.values()),
        "eigh_bytes": 32 * max(inputs.values()) ** 2,
        "projection_flops_over_train": sum(2 * 4 * o * i * (cols[key] + R) for o, i, key in block.values())
        / sum(6 * TOKENS * o * i for o, i, _ in block.values()),
    }
    out = []
    for w in WORLDS:
        state = max(sum(persistent(layers, rank, w).values()) for rank in (0, w - 1))  # rank 0 holds the largest chunks
        ft = 16 * params / w
        transient = max(
            4 * (rows(o, 0, w) * i + math.ceil(i / w) * w * cols[key] + rows(o, 0, w) * cols[key])
            for o, i, key in block.values()
        )
        basis_gather = 2 * 4 * blocks * sum(inputs[key] * c for key, c in cols.items()) * (w - 1) / w
        all_reduce = 2 * 2 * 4 * blocks * sum(R * i for _, i, _ in block.values()) * (w - 1) / w
        out.append({"gpus": w, "fora_persistent_bytes": state, "full_ft_state_bytes": ft, "fits_80GB": ft <= GPU_BYTES,
                    "fora_over_ft": state / ft, "step_transient_bytes": transient,
                    "fora_comm_bytes_per_step": basis_gather + all_reduce, "fsdp_comm_bytes_per_step": 8 * params * (w - 1) / w})  # fmt: skip
    return out, fixed


def from_shapes(shapes: dict[str, list[Any]]) -> dict[str, tuple[int, int, int, int, str]]:
    """``{module name: [d_out, d_in, k, r, complement]}`` of a fit -> :func:`persistent`'s layers (input per block)."""
    group = {n: key for n, (_, _, key) in block_layers(1, 1, 1, 1, 1).items()}
    return {
        n: (o, i, k, r, f"{n.rsplit('.', 1)[0]}.{group[n.rsplit('.', 1)[1]]}") for n, (o, i, k, r, _) in shapes.items()
    }


def check_small() -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The per-rank formula against ``memory.py`` a)'s measured bytes (same shapes, k, r)."""
    path = RESULTS / "memory.json"
    if not path.exists():
        return [], []
    rows_, out = [], []
    for label, run in (json.loads(path.read_text()).get("distributed") or {}).items():
        layers = from_shapes(run["shapes"])
        world = run["world"] if run["strategy"] in ("fsdp2", "fsdp1") else 1
        for rank, measured in enumerate(run["state_bytes"]):
            predicted = sum(persistent(layers, rank % world, world).values())
            copy = max(4 * rows(o, rank % world, world) * i for o, i, *_ in layers.values())  # one layer's rows
            out.append({"run": label, "rank": rank, "measured": measured, "predicted": predicted,
                        "copy_measured": run["transient_bytes"][rank], "copy_predicted": copy})  # fmt: skip
            rows_.append([label, rank, measured, predicted, predicted / measured, run["transient_bytes"][rank], copy])
    return rows_, out


def main() -> None:
    payload: dict[str, Any] = {"worlds": WORLDS, "r": R, "tokens_per_step": TOKENS}
    parts = []
    fixed_rows = []
    for name in MODELS:
        for label, f in K_FRACS.items():
            table, fixed = model_rows(name, f)
            payload[f"{name}, {label}"] = {"fixed": fixed, "by_gpus": table}
            fixed_rows.append([name, label, fixed["calibration_all_at_once_bytes"] / GIB, fixed["calibration_one_block_bytes"] / GIB,
                               fixed["eigh_bytes"] / GIB, 100 * fixed["projection_flops_over_train"]])  # fmt: skip
            parts.append(
                f"#### {name}, {label} (stored basis min(k, d_in - k) = {min(f, 1 - f):g} d_in)\n\n"
                + md_table(
                    [
                        "GPUs",
                        "full FT state GiB / rank",
                        "fits 80 GB",
                        "FORA persistent GiB / rank",
                        "FORA / FT state %",
                        "step transient GiB",
                        "FORA comm GiB / step",
                        "FSDP2's own comm GiB / step",
                    ],  # fmt: skip
                    [
                        [
                            r["gpus"],
                            r["full_ft_state_bytes"] / GIB,
                            "yes" if r["fits_80GB"] else "no",
                            r["fora_persistent_bytes"] / GIB,
                            100 * r["fora_over_ft"],
                            r["step_transient_bytes"] / GIB,
                            r["fora_comm_bytes_per_step"] / GIB,
                            r["fsdp_comm_bytes_per_step"] / GIB,
                        ]
                        for r in table
                    ],  # fmt: skip
                )
            )
    check_rows, check = check_small()
    payload["check_against_memory_json"] = check
    fixed_md = md_table(
        [
            "model",
            "k",
            "calibration sums, all blocks at once GiB",
            "calibration sums, one block per group GiB",
            "eigh on the owning rank GiB",
            "projection flops % of train (4M tokens / step)",
        ],  # fmt: skip
        fixed_rows,
    )
    md = "\n\n".join(
        [
            "Made by `python benchmarks/scale_out_model.py` (analytic; formulas in its docstring).",
            "### Phases that do not shrink with the GPU count (per rank that runs them)\n\n" + fixed_md,
            "### Per rank, by GPU count (FSDP2, float32 master weights)\n\n" + "\n\n".join(parts),
            "### The formula against the bytes measured by `benchmarks/memory.py` a) (small Llama, 1 and 2 processes)\n\n"
            + (
                md_table(
                    [
                        "run",
                        "rank",
                        "FORA bytes measured",
                        "predicted",
                        "predicted / measured",
                        "step copy bytes measured",
                        "predicted (one layer's rows)",
                    ],
                    check_rows,
                )  # fmt: skip
                if check_rows
                else "(no results/memory.json yet: run benchmarks/memory.py first)"
            ),
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_out_model.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "scale_out_model.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
