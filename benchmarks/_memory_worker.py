"""One rank of ``memory.py``'s distributed rows (launched by tests/distributed/harness.py's ``launch``).

``python _memory_worker.py CONFIG.json``: for each scenario, a small random Llama (transformers ``LlamaConfig``)
in :class:`~fora_lightning.CausalLMModule` is trained ``steps`` AdamW steps on random tokens through the FORA
Callback with every default (calibrated on other random tokens) under the scenario's strategy; rank 0 writes each
rank's persistent FORA bytes (``nbytes_summary(..., host=True, spectrum=True)``: bases, U, S, V, delta, spectra,
anchors, each tensor once), split by field.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fora_lightning import FORA, CausalLMModule, layerwise_step
from fora_lightning.core.subspace import nbytes_summary
from tests.distributed._worker import make_strategy
from tests.distributed.harness import every_rank, exit_cleanly

LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip
# untied: FSDP1 with each Linear its own unit would own the tied embedding in lm_head's unit (sharded when embed runs)
SEQ, GLOBAL_BATCH, CALIB = 64, 8, 32  # tokens per sequence, sequences per optimizer step, calibration sequences


def tokens(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (n, SEQ), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": i} for i in ids]


def by_field(subspaces: dict[str, Any]) -> dict[str, int]:
    """This rank's bytes per field (each tensor once)."""
    seen: dict[int, tuple[str, int]] = {}
    for s in subspaces.values():
        for n, t in s.tensors().items():
            seen[id(t)] = (n, t.numel() * t.element_size())
    out: dict[str, int] = {}
    for n, b in seen.values():
        out[n] = out.get(n, 0) + b
    return out


@contextmanager
def record_transients(sizes: list[int]) -> Iterator[None]:
    """Append to ``sizes`` the bytes of every copy a :class:`LayerwiseStep` unit takes before its step."""
    original = layerwise_step.LayerwiseStep.__init__

    def init(self: Any, optimizer: Any, units: Any, done: Any = None) -> None:
        for unit in units:

            def before(fn: Any = unit.before) -> Any:
                saved = fn()
                sizes.append(saved.numel() * saved.element_size() if isinstance(saved, torch.Tensor) else 0)
                return saved

            unit.before = before
        original(self, optimizer, units, done)

    layerwise_step.LayerwiseStep.__init__ = init
    try:
        yield
    finally:
        layerwise_step.LayerwiseStep.__init__ = original


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    world = cfg["world"]
    fora = FORA(calibration=DataLoader(tokens(CALIB, seed=2), batch_size=4), progress=False, **cfg.get("fora", {}))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world if cfg["strategy"] != "single" else 1,
        strategy=make_strategy({"use_orig_params": True, "state_dict_type": "sharded", **cfg}),
        precision="32-true",
        max_steps=cfg["steps"],
        callbacks=[fora],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    torch.manual_seed(0)
    module = CausalLMModule(config=LLAMA, lr=1e-3, weight_decay=0.1)
    rank = int(os.environ.get("RANK", "0"))
    data = tokens(cfg["steps"] * GLOBAL_BATCH, seed=1)[rank::world]
    sizes: list[int] = []
    with record_transients(sizes):
        trainer.fit(module, DataLoader(data, batch_size=GLOBAL_BATCH // world))
    subs = fora.subspaces
    return {
        "state_bytes": every_rank(nbytes_summary(subs, host=True, spectrum=True)),
        "device_bytes": every_rank(nbytes_summary(subs, host=False, spectrum=True)),
        "by_field": every_rank(by_field(subs)),
        "transient_bytes": every_rank(max(sizes, default=0)),
        "layers": len(subs),
        "shapes": {n: [s.d_out, s.d_in, s.k, s.r, bool(s.complement)] for n, s in subs.items()},
        "protected_params": sum(s.d_out * s.d_in for s in subs.values()),
        "model_params": sum(p.numel() for p in module.parameters()),
    }


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    out: dict[str, Any] = {}
    for scenario in cfg["scenarios"]:
        try:
            out[scenario["name"]] = run({"world": cfg["world"], **scenario})
        except Exception:  # noqa: BLE001 - reported by memory.py
            out[scenario["name"]] = {"error": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out, cfg["out"])
    exit_cleanly()


if __name__ == "__main__":
    main()
