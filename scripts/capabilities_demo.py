"""Measurements for docs/capabilities.md on the demo model (assets/demo): several capabilities and a chain.

    python scripts/capabilities_demo.py            # writes results/demo/inspect_capabilities.json
    fora-inspect --subspaces results/demo/inspect_translation.safetensors --out results/demo/inspect

1. combined vs union: keep {translation, actions} (the demo model's translation and its plain
   action-sequence text) while learning SCAN (plain fine-tuning and translation-only FORA: the
   compare table in results/demo/table.md, same optimizer settings).
2. chain: A = translation (kept from the start), B = SCAN (learned keeping A, then FORA.extend),
   C = back-translation (target sentence -> source sentence, learned keeping A and B).
Metrics: exact match (greedy) on held-out prompts, response NLL, KL(base || tuned) per token.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fora_lightning import FORA
from fora_lightning.core.subspace_file import read_metadata
from fora_lightning.llm.causal_lm import CausalLMModule
from fora_lightning.llm.generation import evaluate_exact_match, read_pairs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
OUT = ROOT / "results" / "demo"
N_EVAL, BATCH, LR = 64, 32, 2e-3  # as configs/compare_demo.yaml (lr, batch, steps, clipping)
STEPS = int(os.environ.get("STEPS", 150))
torch.set_num_threads(1)


def _encode(tok, prompts: list[str], responses: list[str] | None) -> dict[str, torch.Tensor]:
    """``<s> prompt [response] </s>``; labels on the response (and eos) only."""
    texts = [p + (" " + r if responses else "") + " " + tok.eos_token for p, r in zip(prompts, responses or prompts)]
    enc = tok(texts, return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if responses:
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for i, p in enumerate(prompts):
            labels[i, : len(tok(p)["input_ids"])] = -100
        batch["labels"] = labels
    return batch


def loader(tok, prompts, responses=None, shuffle=False, batch=BATCH) -> DataLoader:
    rows = list(zip(prompts, responses or [None] * len(prompts)))
    return DataLoader(
        rows,
        batch_size=batch,
        shuffle=shuffle,
        collate_fn=lambda b: _encode(tok, [p for p, _ in b], [r for _, r in b] if responses else None),
    )


def back_translation(path: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Task C: ``translate : <target sentence> =`` -> the source sentence."""
    prompts, answers = read_pairs(path, limit=limit)
    return [f"translate : {a} =" for a in answers], [p.removeprefix("translate : ").removesuffix(" =") for p in prompts]


def actions_texts(path: Path, limit: int) -> list[str]:
    """The second kept capability: plain action sequences, as the demo model was pretrained on them."""
    return read_pairs(path, limit=limit)[1]


@torch.no_grad()
def kl_per_token(base, tuned, batches) -> float:
    """Mean over non-padding positions of KL(base || tuned) of the next-token distributions."""
    total = count = 0.0
    for b in batches:
        lp = torch.log_softmax(base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1)
        lq = torch.log_softmax(tuned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        m = b["attention_mask"].bool()
        total += float(kl[m].sum())
        count += float(m.sum())
    return total / count


@torch.no_grad()
def response_nll(model, batches) -> float:
    total = count = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
        labels = b["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += float((labels != -100).sum())
    return total / count


class Setting:
    def __init__(self) -> None:
        self.base = CausalLMModule(model=str(DEMO / "model"), lr=LR, warmup_ratio=0.05)
        self.tok = self.base.tokenizer
        tok = self.tok
        rng = random.Random(0)
        calib = [
            json.loads(line)["prompt"] for line in (DEMO / "translation" / "calibration.jsonl").read_text().splitlines()
        ]
        self.calibration = loader(tok, calib)
        act = actions_texts(DEMO / "scan" / "train.jsonl", 2000)
        rng.shuffle(act)
        self.actions_calibration = loader(tok, act[:256])
        self.actions_eval = loader(tok, act[256 : 256 + N_EVAL])
        self.evals = {
            "translation": read_pairs(DEMO / "translation" / "test.jsonl", limit=N_EVAL),
            "scan": read_pairs(DEMO / "scan" / "test.jsonl", limit=N_EVAL),
            "back": back_translation(DEMO / "translation" / "test.jsonl", limit=N_EVAL),
        }
        self.eval_batches = {k: list(loader(tok, *v)) for k, v in self.evals.items()}
        self.train = {
            "scan": read_pairs(DEMO / "scan" / "train.jsonl"),
            "back": back_translation(DEMO / "translation" / "train.jsonl"),
        }

    def fresh(self) -> CausalLMModule:
        return copy.deepcopy(self.base)

    def fit(self, model: CausalLMModule, task: str, callbacks: list) -> float:
        t0 = time.time()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            gradient_clip_val=1.0,
        )
        trainer.fit(model, loader(self.tok, *self.train[task], shuffle=True))
        return time.time() - t0

    def metrics(self, model: CausalLMModule, base: CausalLMModule | None = None) -> dict[str, float]:
        base = base or self.base
        out: dict[str, float] = {}
        for name, (prompts, answers) in self.evals.items():
            out[f"{name}_em"] = evaluate_exact_match(model.model, self.tok, prompts, answers).accuracy
            out[f"{name}_nll"] = response_nll(model, self.eval_batches[name])
        out["translation_kl"] = kl_per_token(base, model, self.eval_batches["translation"])
        out["actions_kl"] = kl_per_token(base, model, self.actions_eval)
        return {k: round(v, 4) for k, v in out.items()}


def total_k(fora: FORA) -> int:
    return sum(s.k for s in fora.subspaces.values())


def combined_vs_union(s: Setting) -> dict:
    caps = {"translation": s.calibration, "actions": s.actions_calibration}
    runs = {"base": {"metrics": s.metrics(s.base)}}
    variants = {
        "covariance": dict(calibration=caps, combine="covariance"),
        "union": dict(calibration=caps, combine="union"),
    }
    for name, kwargs in variants.items():
        model = s.fresh()
        fora = FORA(progress=False, **kwargs)
        wall = s.fit(model, "scan", [fora])
        runs[name] = {"metrics": s.metrics(model), "total_k": total_k(fora), "wall_s": round(wall, 1)}
    return runs


def chain(s: Setting) -> dict:
    a_file, ab_file = OUT / "inspect_translation.safetensors", OUT / "inspect_chain_AB.safetensors"
    for f in (a_file, ab_file):
        f.unlink(missing_ok=True)
    steps = {"0 base (knows A)": s.metrics(s.base)}
    model = s.fresh()
    fora_b = FORA(
        calibration={"translation": s.calibration},
        subspaces=a_file,
        extend_to=ab_file,
        extend_calibration={"scan": loader(s.tok, s.train["scan"][0][:512])},
        progress=False,
    )
    s.fit(model, "scan", [fora_b])
    steps["1 learn B=scan, keep A"] = s.metrics(model)
    control = copy.deepcopy(model)
    fora_c = FORA(subspaces=ab_file, progress=False)
    s.fit(model, "back", [fora_c])
    steps["2 learn C=back, keep A+B"] = s.metrics(model)
    fora_ctl = FORA(subspaces=a_file, progress=False)
    s.fit(control, "back", [fora_ctl])
    steps["2' control: learn C, keep A only"] = s.metrics(control)
    k = {
        name: sum(layer["k"] for layer in read_metadata(f)["layers"].values())
        for name, f in (("A", a_file), ("A+B", ab_file))
    }
    return {"steps": steps, "total_k": k}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Combined-vs-union and chained fine-tunes on the demo model.")
    parser.add_argument("part", nargs="?", choices=["combine", "chain"], help="run one part only (default: both)")
    part = parser.parse_args(argv).part
    torch.manual_seed(0)
    pl.seed_everything(0, verbose=False)
    s = Setting()
    result = {
        "settings": {"steps": STEPS, "batch": BATCH, "lr": LR, "n_eval": N_EVAL, "energy": 0.99, "weight_rank": 8}
    }
    if part != "chain":
        result["combined_vs_union"] = combined_vs_union(s)
    if part != "combine":
        result["chain"] = chain(s)
    path = OUT / ("inspect_capabilities.json" if part is None else f"inspect_capabilities_{part}.json")
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
