"""Compare FORA with the baselines on one setting: same model, data, seed and step budget for every method.

``python cli.py compare --config configs/compare_demo.yaml [--max-steps N] [--methods fora,plain_ft] [--output DIR]``

Methods (:mod:`~fora_lightning.eval.methods`) run in the order of ``METHODS``; ``fora`` first, since
``weight_projection`` and ``random`` copy its k per layer. The setting is :mod:`~fora_lightning.eval.setting`,
the outputs :mod:`~fora_lightning.eval.compare_output`.

Each run: ``seed_everything(seed)``, a fresh :class:`~fora_lightning.CausalLMModule` (per-method ``model``
overrides, e.g. a LoRA learning rate), the shared :class:`~fora_lightning.TextDataModule`, ``Trainer.fit``
with a progress bar; then LoRA adapters are merged and the tuned model is scored: the new task's and the
kept capability's metric (greedy exact match, or perplexity), ``KL(base || tuned)`` per token and the mean
layer leakage on held-out preserved text. Writes ``results.json`` (the issue's shape), ``details.json``
(per-layer k and leakage, perplexities, extra metrics, the config), ``table.md`` and ``plot.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from fora_lightning.eval.compare_output import format_table, plot, results_json
from fora_lightning.eval.generation import generate_greedy, read_pairs
from fora_lightning.eval.methods import LABELS, METHODS, build_callback
from fora_lightning.eval.metrics import CausalPerplexity, ExactMatch
from fora_lightning.eval.preservation import evaluate_preservation, model_target_names
from fora_lightning.eval.setting import EvalSet, Setting, load_setting
from fora_lightning.llm import CausalLMModule, TextDataModule
from fora_lightning.llm.encoding import PadCollator, encode_pairs
from fora_lightning.lora import merge_lora, trainable_parameters


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Scores a model on the setting's evaluation sets; holds the base model and the held-out batches."""

    def __init__(self, setting: Setting, tokenizer, base: nn.Module, add_bos: bool, append_eos: bool, max_length: int) -> None:
        self.setting, self.tokenizer, self.base = setting, tokenizer, base
        self.encode = dict(tokenizer=tokenizer, max_length=max_length, add_bos=add_bos, append_eos=append_eos)
        self.pairs = {
            key: read_pairs(s.path, s.prompt_field, s.answer_field, s.limit)
            for key, s in self.sets().items()
        }

    def sets(self) -> dict[str, EvalSet]:
        return {"preserved": self.setting.preserved, "new_task": self.setting.new_task, "heldout": self.setting.heldout, **{
            f"extra/{n}": s for n, s in self.setting.extra.items()}}

    def batches(self, key: str) -> list[dict[str, torch.Tensor]]:
        """Tokenised ``[bos] prompt response [eos]`` rows (labels on the response), padded per batch."""
        prompts, answers = self.pairs[key]
        enc = encode_pairs({"prompt": prompts, "response": answers}, **self.encode)
        rows = [{"input_ids": i, "labels": l} for i, l in zip(enc["input_ids"], enc["labels"])]
        collate = PadCollator(self.tokenizer.pad_token_id)
        size = self.sets()[key].batch_size
        return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]

    @torch.no_grad()
    def score(self, model: nn.Module, key: str) -> float:
        """Exact match of greedy generations, or perplexity of the responses."""
        spec = self.sets()[key]
        prompts, answers = self.pairs[key]
        if spec.metric == "exact_match":
            metric = ExactMatch()
            preds = generate_greedy(model, self.tokenizer, prompts, spec.batch_size, spec.max_new_tokens)
            metric.update([p.split(spec.stop)[0] if spec.stop else p for p in preds], answers)
            return float(metric.compute())
        metric = CausalPerplexity()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for batch in self.batches(key):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            metric.update(logits, batch["input_ids"], batch["attention_mask"], batch["labels"])
        model.train(was_training)
        return float(metric.compute())

    def evaluate(self, model: nn.Module, layers: Sequence[str]) -> dict[str, Any]:
        out = {key: self.score(model, key) for key in ("preserved", "new_task", *[f"extra/{n}" for n in self.setting.extra])}
        out["preservation"] = evaluate_preservation(self.base, model, self.batches("heldout"), layers)
        return out


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """What one method's fit produced."""

    scores: dict[str, Any]
    trainable_params: int
    wall_s: float
    ks: dict[str, int]


def run_method(name: str, args: dict[str, Any], setting: Setting, dm: TextDataModule, evaluator: Evaluator,
               fora_ks: Mapping[str, int] | None, progress: bool) -> Run:
    """Fit method ``name`` from a fresh model with the shared seed, then score it."""
    args = dict(args)
    model_overrides = args.pop("model", {}) or {}
    pl.seed_everything(setting.seed, workers=True, verbose=False)
    module = CausalLMModule(**{**setting.model, **model_overrides})
    callback = build_callback(name, args, setting.target_modules, fora_ks)
    trainer_kwargs = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
        "default_root_dir": str(Path(setting.output_dir) / "runs" / name), **setting.trainer,
        "enable_progress_bar": progress, "callbacks": [callback],
    }
    trainer = pl.Trainer(**trainer_kwargs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    trainable = trainable_parameters(module).trainable
    ks = {n: s.k for n, s in getattr(callback, "subspaces", {}).items()} if name != "lora" else {}
    with torch.no_grad():
        merge_lora(module.model)
    layers = model_target_names(module, module.model, setting.target_modules)
    return Run(evaluator.evaluate(module.model, layers), trainable, wall, ks)


# ------------------------------------------------------------------------------------------ entry point
def compare(setting: Setting, methods: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``methods`` (default: those in the config) and write the outputs to ``setting.output_dir``."""
    chosen = [m for m in METHODS if m in (methods or setting.methods)]
    missing = set(methods or ()) - set(setting.methods)
    if missing:
        raise ValueError(f"methods {sorted(missing)} have no entry in the config's methods")
    if {"weight_projection", "random"} & set(chosen) and "fora" not in chosen:
        raise ValueError("weight_projection and random copy FORA's k per layer: include 'fora' in methods")
    out = Path(setting.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if setting.threads:
        torch.set_num_threads(setting.threads)
    dm = TextDataModule(**{"seed": setting.seed, **setting.data})
    dm.setup("fit")
    pl.seed_everything(setting.seed, verbose=False)  # as in every run (matters only for a randomly initialised model)
    base_module = CausalLMModule(**setting.model)
    base_model = base_module.model.eval().requires_grad_(False)
    evaluator = Evaluator(setting, dm.tokenizer, base_model, dm.add_bos, dm.append_eos, dm.max_length)
    base = {key: evaluator.score(base_model, key) for key in ("preserved", "new_task", *[f"extra/{n}" for n in setting.extra])}
    runs: dict[str, Run] = {}
    fora_ks: dict[str, int] | None = None
    for i, name in enumerate(tqdm(chosen, desc=f"compare {setting.setting}", disable=not progress)):
        if progress:
            tqdm.write(f"[{i + 1}/{len(chosen)}] {LABELS[name]}")
        runs[name] = run_method(name, setting.methods[name], setting, dm, evaluator, fora_ks, progress)
        if name == "fora":
            fora_ks = runs[name].ks
    results = results_json(setting, base, runs)
    steps = int(setting.trainer.get("max_steps", -1))
    details = {
        "setting": setting.setting, "seed": setting.seed, "max_steps": steps, "base": base,
        "methods": {n: {"k": r.ks, **{k: v for k, v in r.scores.items() if k not in ("preserved", "new_task")}} for n, r in runs.items()},
        "config": asdict(setting),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    table = format_table(results, setting, base, runs, steps)
    (out / "table.md").write_text(table + "\n")
    plot(results, setting, out / "plot.png")
    if progress:
        print("\n" + table + f"\n\nwritten to {out}/results.json, details.json, table.md, plot.png", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``compare --config FILE [--max-steps N] [--methods a,b] [--output DIR] [--no-progress]``."""
    parser = argparse.ArgumentParser(prog="compare", description="Run FORA and the baselines on one setting and tabulate them.")
    parser.add_argument("--config", required=True, help="a compare YAML (see configs/compare_demo.yaml)")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps for every method")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--output", default=None, help="override output_dir")
    parser.add_argument("--limit", type=int, default=None, help="cap every evaluation set at this many items")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or table print")
    args = parser.parse_args(argv)
    setting = load_setting(args.config)
    if args.max_steps is not None:
        setting.trainer = {**setting.trainer, "max_steps": args.max_steps}
    if args.output is not None:
        setting.output_dir = args.output
    if args.limit is not None:
        setting.cap_limits(args.limit)
    methods = args.methods.split(",") if args.methods else None
    compare(setting, methods, progress=not args.no_progress)
    return 0
