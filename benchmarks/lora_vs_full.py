"""FORA-LoRA vs full fine-tuning vs FORA full: trainable parameters and training-step time, side by side.

One tiny Llama causal LM (built from a config, random weights), the same batches for every variant:

    full       plain full fine-tuning (every parameter trains, AdamW)
    fora       FORA Callback, full fine-tuning of the target linears (gradient projection + re-projection)
    fora_lora  ForaLoRA Callback (projected LoRA on the same targets, r_lora = --lora-rank)

The variants run round-robin (``--rounds`` fits each, interleaved) so drift on a shared machine hits all of
them alike. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
optimizer step and FORA's hooks; calibration in ``on_train_start`` is not inside). The first ``--warmup``
steps of each fit are dropped; the table shows the median over the remaining steps of all rounds, and
the interquartile range, and the median process-CPU time per step (less sensitive to other load on a
shared machine than wall time). Writes ``benchmarks/results/lora_vs_full.json``.

    python benchmarks/lora_vs_full.py                 # defaults: hidden 256, 4 layers, seq 128, batch 8
    python benchmarks/lora_vs_full.py --hidden 128 --layers 2 --steps 12 --rounds 2   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fora_lightning import FORA, ForaLoRA
from fora_lightning.lora import trainable_parameters

RESULTS = Path(__file__).parent / "results" / "lora_vs_full.json"
VARIANTS = ("full", "fora", "fora_lora")


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)


class StepTimer(pl.Callback):
    """Wall and process-CPU time of every training step (batch start to batch end, after the optimizer step)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_callback(
    variant: str, args: argparse.Namespace, calibration: list[dict[str, torch.Tensor]]
) -> pl.Callback | None:
    common = dict(calibration=calibration, rank=args.k, weight_rank=args.weight_rank, progress=False)
    if variant == "fora":
        return FORA(**common)
    if variant == "fora_lora":
        return ForaLoRA(**common, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank)
    return None


def run_once(
    variant: str, base: torch.nn.Module, args: argparse.Namespace, train: DataLoader, calibration: list
) -> dict:
    module = CausalLM(copy.deepcopy(base))
    timer = StepTimer()
    fora = make_callback(variant, args, calibration)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[c for c in (fora, timer) if c is not None],
    )
    trainer.fit(module, train)
    counts = trainable_parameters(module)
    subspace_bytes = sum(s.nbytes() for s in fora.subspaces.values()) if fora is not None else 0
    return {
        "wall": timer.wall[args.warmup :],
        "cpu": timer.cpu[args.warmup :],
        "trainable": counts.trainable,
        "total": counts.total,
        "subspace_bytes": subspace_bytes,
    }


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=64, help="fixed k (protected input dimensions) for FORA and FORA-LoRA")
    parser.add_argument("--weight-rank", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="steps per fit")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each fit")
    parser.add_argument("--rounds", type=int, default=3, help="fits per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least distorted on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    base = build_model(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch * args.steps, args.seq), generator=gen)
    train = DataLoader(TensorDataset(ids), batch_size=args.batch)
    calibration = [
        {"input_ids": x, "attention_mask": torch.ones_like(x)}
        for x in torch.randint(0, args.vocab, (4 * args.batch, args.seq), generator=gen).split(args.batch)
    ]

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            runs[variant].append(run_once(variant, base, args, train, calibration))

    total_base = sum(p.numel() for p in base.parameters())
    rows = {}
    for variant in VARIANTS:
        wall = [t for r in runs[variant] for t in r["wall"]]
        cpu = [t for r in runs[variant] for t in r["cpu"]]
        q1, med, q3 = quartiles(wall)
        first = runs[variant][0]
        rows[variant] = {
            "trainable_params": first["trainable"],
            "model_params": first["total"],
            "trainable_percent_of_base": 100.0 * first["trainable"] / total_base,
            "adamw_state_mib": 2 * 4 * first["trainable"] / 2**20,
            "subspace_mib": first["subspace_bytes"] / 2**20,
            "step_ms_median": 1e3 * med,
            "step_ms_q1": 1e3 * q1,
            "step_ms_q3": 1e3 * q3,
            "step_cpu_ms_median": 1e3 * statistics.median(cpu),
            "n_steps_timed": len(wall),
        }
    full = rows["full"]
    print(
        f"\nTiny Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, batch {args.batch}; "
        f"{total_base:,} parameters; k={args.k}, weight_rank={args.weight_rank}, lora_rank={args.lora_rank}; "
        f"{args.threads} CPU threads; {args.rounds} rounds x {args.steps - args.warmup} timed steps"
    )
    header = (
        f"{'variant':<10} {'trainable':>11} {'% of model':>10} {'x full':>8} {'AdamW MiB':>10} "
        f"{'wall ms/step (IQR)':>22} {'x full':>7} {'CPU ms/step':>12} {'x full':>7}"
    )
    print(header + "\n" + "-" * len(header))
    for variant, row in rows.items():
        iqr = f"{row['step_ms_median']:.1f} ({row['step_ms_q1']:.1f}-{row['step_ms_q3']:.1f})"
        print(
            f"{variant:<10} {row['trainable_params']:>11,} {row['trainable_percent_of_base']:>10.3f} "
            f"{row['trainable_params'] / full['trainable_params']:>8.4f} {row['adamw_state_mib']:>10.2f} {iqr:>22} "
            f"{row['step_ms_median'] / full['step_ms_median']:>7.2f} {row['step_cpu_ms_median']:>12.1f} "
            f"{row['step_cpu_ms_median'] / full['step_cpu_ms_median']:>7.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_params": total_base,
        "environment": {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "variants": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
