"""One rank of the LLM-stack runs (launched by tests/distributed/harness.py; :func:`run` is also the reference).

``python _llm_worker.py CONFIG.json``: for each scenario, ``CausalLMModule`` (a tiny Llama) + ``TextDataModule``
(jsonl files) + ``FORA`` or ``ForaLoRA`` under ``ddp`` or ``fsdp2`` (``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1, save_distributed_checkpoint=True)``, the settings of configs/fsdp.yaml on CPU) trains
``steps`` steps, saves a checkpoint, resumes from it to ``resume_steps`` with ``save_dir`` set, so the end of fit
writes the tuned model (and the adapter). Every row has the same length and response tokens (no padding), and
global batch ``i`` is rows ``4 i .. 4 i + 3`` for every world size, so any world size follows the same trajectory.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fora_lightning import FORA, ForaLoRA
from fora_lightning.llm import CausalLMModule, TextDataModule, TextSource
from fora_lightning.llm.encoding import PadCollator
from tests.distributed.harness import exit_cleanly
from tests.tiny_lm import tiny_llama_config

GLOBAL_BATCH = 4
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class OrderedText(TextDataModule):
    """``TextDataModule`` whose training rows come unshuffled, split over ranks as global batches of 4."""

    def __init__(self, world: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = self.splits["train"].with_format(columns=["input_ids", "labels"])
        sampler = None
        if self.world > 1:
            sampler = DistributedSampler(ds, num_replicas=self.world, rank=int(os.environ["RANK"]), shuffle=False)
        return DataLoader(
            ds,
            batch_size=GLOBAL_BATCH // self.world,
            sampler=sampler,
            collate_fn=PadCollator(self.tokenizer.pad_token_id),
        )


def make_module(save_dir: str | None, tokenizer: str) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(config=tiny_llama_config(), tokenizer=tokenizer, lr=1e-2, warmup_ratio=0.0, save_dir=save_dir)


def make_callback(method: str) -> pl.Callback:
    if method == "fora":
        return FORA(target_modules=TARGETS, energy=0.9, weight_rank=2, progress=False, precision="float32")
    return ForaLoRA(target_modules=TARGETS, energy=0.9, weight_rank=2, lora_rank=4, progress=False)


def make_strategy(kind: str, world: int) -> Any:
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    if kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True)
    return "auto"


def fit(cfg: dict[str, Any], steps: int, save_dir: str | None, ckpt_path: str | None) -> pl.Trainer:
    world = cfg["world"]
    rank = int(os.environ.get("RANK", "0"))
    data = OrderedText(
        world,
        tokenizer=cfg["tokenizer"],
        task=TextSource(cfg["task"]),
        preserve=TextSource(cfg["keep"], prompt_field="question", response_field="answer"),
        preserve_val_size=0,
        cache_dir=os.path.join(cfg["root"], f"cache-{cfg['name']}-{rank}"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world if cfg["strategy"] != "single" else 1,
        strategy=make_strategy(cfg["strategy"], world),
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[make_callback(cfg["method"])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=os.path.join(cfg["root"], cfg["name"]),
    )
    trainer.fit(make_module(save_dir, cfg["tokenizer"]), datamodule=data, ckpt_path=ckpt_path)
    return trainer


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train ``steps``, checkpoint to ``ckpt``, resume to ``resume_steps`` exporting to ``save_dir``."""
    fit(cfg, cfg["steps"], None, None).save_checkpoint(cfg["ckpt"])
    trainer = fit(cfg, cfg["resume_steps"], cfg["save_dir"], cfg["ckpt"])
    return {"global_step": trainer.global_step, "save_dir": cfg["save_dir"]}


def main() -> None:
    """Every scenario of the config in these same processes; one that raises is recorded as ``{"error": ...}``."""
    torch.set_num_threads(1)
    cfg = json.loads(open(sys.argv[1]).read())
    out: dict[str, Any] = {}
    for scenario in cfg["scenarios"]:
        try:
            out[scenario["name"]] = run({"world": cfg["world"], **scenario})
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            out[scenario["name"]] = {"error": traceback.format_exc()}
            print(f"scenario {scenario['name']} raised:\n{out[scenario['name']]['error']}", file=sys.stderr, flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out, cfg["out"])
    exit_cleanly()


if __name__ == "__main__":
    main()
