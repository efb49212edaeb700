"""FORA's overhead model under FSDP2, analytic (no hardware): flops and memory per rank for a 70B model.

    python benchmarks/scale_out_model.py        # results/scale_out_model.{json,md}

Per layer ``d_out x d_in`` (basis k, channel r) and step, one projection costs ``4 d_out d_in (k + r)`` flops;
update mode runs two (``Pi(G)`` before the step, the re-projection after), update-only one. Training costs
``6 T d_out d_in`` (forward + both backward GEMMs). Under FSDP2 each of W ranks projects its ``d_out / W`` rows
(tests/distributed/test_scale_out.py) and trains on ``T_global / W`` tokens, so the ratio
``8 (k + r) / (6 T_global)`` (update mode) does not depend on W. Memory per rank: the bases ``Q``
(``d_in x k`` per distinct input) and ``U, S, V`` are replicated; the anchors ``A0 = W0 Q`` (``d_out x k``) and
``B0 = U^T W0`` are row-sharded, ``1/W`` each (float32 throughout). Llama-3-70B shapes, k = d_in / 4, r = 8.
"""

from __future__ import annotations

import json

from _bench import RESULTS, md_table

HIDDEN, FFN, LAYERS, HEAD_DIM, HEADS, KV_HEADS = 8192, 28672, 80, 128, 64, 8
SHAPES = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
          "o_proj": (HIDDEN, HEADS * HEAD_DIM), "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}  # fmt: skip
DISTINCT_INPUTS = {
    "attn_in": HIDDEN,
    "attn_out": HEADS * HEAD_DIM,
    "mlp_in": HIDDEN,
    "mlp_act": FFN,
}  # q/k/v share one Q, gate/up one
PARAMS_70B = 70.6e9
TOKENS = 4 * 2**20
K_FRAC, R = 0.25, 8
GIB = 2**30


def main() -> None:
    linear = sum(o * i for o, i in SHAPES.values())
    proj = sum(4 * o * i * (int(K_FRAC * i) + R) for o, i in SHAPES.values()) * LAYERS  # one projection, all layers
    train = 6 * TOKENS * linear * LAYERS
    bases = (
        4
        * LAYERS
        * (
            sum(d * int(K_FRAC * d) for d in DISTINCT_INPUTS.values())
            + sum((o + i + 1) * R for o, i in SHAPES.values())
        )
    )
    anchors = 4 * LAYERS * sum(o * int(K_FRAC * i) + R * i for o, i in SHAPES.values())
    rows, out = [], []
    for world in (8, 16, 32, 64, 128, 256, 512):
        r = {"gpus": world, "tokens_per_rank": TOKENS // world, "train_tflop_per_rank": train / world / 1e12,
             "fora_update_tflop_per_rank": 2 * proj / world / 1e12, "update_over_train": 2 * proj / train,
             "update_only_over_train": proj / train, "bases_gib_per_rank": bases / GIB, "anchors_gib_per_rank": anchors / world / GIB,
             "fora_gib_per_rank": (bases + anchors / world) / GIB, "model_bf16_gib_per_rank": 2 * PARAMS_70B / world / GIB}  # fmt: skip
        out.append(r)
        rows.append([world, r["tokens_per_rank"], r["train_tflop_per_rank"], r["fora_update_tflop_per_rank"], 100 * r["update_over_train"],
                     100 * r["update_only_over_train"], r["bases_gib_per_rank"], r["anchors_gib_per_rank"], r["fora_gib_per_rank"],
                     r["model_bf16_gib_per_rank"]])  # fmt: skip
    header = ["GPUs", "tokens / rank", "train TFLOP / rank", "FORA TFLOP / rank", "update mode % of train", "update-only %",
              "bases GiB / rank (replicated)", "anchors GiB / rank (sharded)", "FORA GiB / rank", "bf16 weights GiB / rank"]  # fmt: skip
    table = (f"### FORA under FSDP2, Llama-3-70B shapes (80 layers), k = d_in/4, r = 8, {TOKENS / 2**20:g}M tokens per step, equal rates\n\n"
             + md_table(header, rows))  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_out_model.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "scale_out_model.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
