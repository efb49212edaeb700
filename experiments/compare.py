"""Compare FORA with the baselines on one setting: same model, data, seed and step budget for every method.

``python cli.py compare --config configs/compare_demo.yaml [--max-steps N] [--methods fora,plain_ft] [--output DIR]
[--seeds 0 1 2] [--sweep]``

Methods (:mod:`~experiments.methods`) run in the order of ``METHODS``; ``fora`` first, since
``weight_projection``, ``random`` and ``osf`` copy its k per layer. The setting is :mod:`~experiments.setting`,
the outputs :mod:`~experiments.compare_output` (one seed) and :mod:`~experiments.sweep_output`
(``--sweep``: each method's own knob over the config's ``sweeps:`` values, :mod:`~experiments.sweep`;
``--seeds``: every point under each seed, mean and spread).

Each run: ``seed_everything(seed)``, a fresh :class:`~fora_lightning.CausalLMModule` (per-method ``model``
overrides, e.g. a LoRA learning rate), the shared :class:`~fora_lightning.TextDataModule`, ``Trainer.fit``
with a progress bar; then LoRA adapters are merged (FORA-LoRA by ``merge_lora``, the PEFT peers by peft's
``merge_and_unload``) and the tuned model is scored: the new task's and the kept capability's metric (greedy
exact match, or perplexity), ``KL(base || tuned)`` per token, PEFT's forgetting measure (the change in mean
per-token loss over every held-out token) and the mean layer leakage on held-out preserved text.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from experiments.compare_output import Run, format_table, plot, results_json, run_row
from experiments.methods import METHODS, build_callback
from experiments.peft_methods import PeftPeer
from experiments.preservation import evaluate_preservation, model_target_names
from experiments.run_log import RunLog
from experiments.setting import EvalSet, Setting, load_setting
from experiments.sweep import Point, expand
from experiments.sweep_output import pareto_plot, sweep_results, sweep_table, write_csv
from fora_lightning.llm import CausalLMModule, TextDataModule
from fora_lightning.llm.encoding import PadCollator, encode_pairs
from fora_lightning.llm.generation import generate_greedy, read_pairs
from fora_lightning.lora import merge_lora, trainable_parameters
from fora_lightning.metrics import CausalPerplexity, ExactMatch


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Scores a model on the setting's evaluation sets; holds the base model and the held-out batches."""

    def __init__(
        self, setting: Setting, tokenizer, base: nn.Module, add_bos: bool, append_eos: bool, max_length: int
    ) -> None:
        self.setting, self.tokenizer, self.base = setting, tokenizer, base
        self.encode = dict(tokenizer=tokenizer, max_length=max_length, add_bos=add_bos, append_eos=append_eos)
        self.pairs = {
            key: read_pairs(s.path, s.prompt_field, s.answer_field, s.limit) for key, s in self.sets().items()
        }

    def sets(self) -> dict[str, EvalSet]:
        return {
            "preserved": self.setting.preserved,
            "new_task": self.setting.new_task,
            "heldout": self.setting.heldout,
            **{f"extra/{n}": s for n, s in self.setting.extra.items()},
        }

    def batches(self, key: str) -> list[dict[str, torch.Tensor]]:
        """Tokenised ``[bos] prompt response [eos]`` rows (labels on the response), padded per batch."""
        prompts, answers = self.pairs[key]
        enc = encode_pairs({"prompt": prompts, "response": answers}, **self.encode)
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(enc["input_ids"], enc["labels"])]
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
        return self.perplexity(model, key, responses_only=True)

    @torch.no_grad()
    def perplexity(self, model: nn.Module, key: str, responses_only: bool) -> float:
        """``exp`` of the mean per-token loss on set ``key``: over the responses, or over every token."""
        metric = CausalPerplexity()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for batch in self.batches(key):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            metric.update(
                logits, batch["input_ids"], batch["attention_mask"], batch["labels"] if responses_only else None
            )
        model.train(was_training)
        return float(metric.compute())

    def heldout_loss(self, model: nn.Module) -> float:
        """Mean per-token loss (nats) over every token of the held-out text: PEFT's forgetting measure is its change."""
        return math.log(self.perplexity(model, "heldout", responses_only=False))

    def base_scores(self) -> dict[str, float]:
        """The base model's metrics and its held-out loss."""
        keys = ("preserved", "new_task", *[f"extra/{n}" for n in self.setting.extra])
        return {**{key: self.score(self.base, key) for key in keys}, "heldout_loss": self.heldout_loss(self.base)}

    def evaluate(self, model: nn.Module, layers: Sequence[str]) -> dict[str, Any]:
        out = {
            key: self.score(model, key)
            for key in ("preserved", "new_task", *[f"extra/{n}" for n in self.setting.extra])
        }
        out["heldout_loss"] = self.heldout_loss(model)
        out["preservation"] = evaluate_preservation(self.base, model, self.batches("heldout"), layers)
        return out


# ------------------------------------------------------------------------------------------ runs
def run_method(
    name: str,
    args: dict[str, Any],
    setting: Setting,
    dm: TextDataModule,
    evaluator: Evaluator,
    fora_ks: Mapping[str, int] | None,
    progress: bool,
    key: str | None = None,
) -> Run:
    """Fit method ``name`` from a fresh model with the setting's seed, then score it (PEFT peers merged)."""
    args = dict(args)
    model_overrides = args.pop("model", {}) or {}
    pl.seed_everything(setting.seed, workers=True, verbose=False)
    module = CausalLMModule(**{**setting.model, **model_overrides})
    callback = build_callback(name, args, setting.target_modules, fora_ks)
    trainer_kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(Path(setting.output_dir) / "runs" / (key or name)),
        **setting.trainer,
        "enable_progress_bar": progress,
        "callbacks": [callback],
    }
    trainer = pl.Trainer(**trainer_kwargs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    trainable = trainable_parameters(module).trainable
    if isinstance(callback, PeftPeer):
        ks = dict(callback.ks)
        callback.merge()  # merge_and_unload, in place: module.model holds plain nn.Linear layers again
    else:
        ks = {n: s.k for n, s in getattr(callback, "subspaces", {}).items()} if name != "lora" else {}
        with torch.no_grad():
            merge_lora(module.model)
    layers = model_target_names(module, module.model, setting.target_modules)
    protection = getattr(callback, "protection", None)
    calibration = dict(protection.monitor.calibration) if protection is not None else {}
    return Run(evaluator.evaluate(module.model, layers), trainable, wall, ks, calibration)


def needs_fora_ks(methods: Mapping[str, Mapping[str, Any]], chosen: Sequence[str]) -> list[str]:
    """The chosen methods that copy FORA's per-layer k (weight_projection, random, OSF at ``effective_rank: fora``)."""
    return [
        m
        for m in chosen
        if m in ("weight_projection", "random") or (m == "osf" and methods[m].get("effective_rank", "fora") == "fora")
    ]


# ------------------------------------------------------------------------------------------ entry point
def compare(
    setting: Setting,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    sweep: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``methods`` (default: those in the config) and write the outputs to ``setting.output_dir``.

    One seed and no ``sweep``: ``results.json`` (the issue's shape), ``details.json``, ``table.md``, ``plot.png``.
    Several ``seeds`` or ``sweep`` (the config's ``sweeps:`` points too): :mod:`~experiments.sweep_output`'s
    ``results.json``, ``results.csv``, ``table.md`` and ``pareto.png`` (mean and spread over seeds), ``details.json``.
    The outputs are rewritten after every run; ``runs.jsonl`` logs each finished run, and ``resume`` reuses the
    runs it holds for this same setting and point (:mod:`~experiments.run_log`) instead of training them again.
    """
    chosen = [m for m in METHODS if m in (methods or setting.methods)]
    missing = set(methods or ()) - set(setting.methods)
    if missing:
        raise ValueError(f"methods {sorted(missing)} have no entry in the config's methods")
    copying = needs_fora_ks(setting.methods, chosen)
    if copying and "fora" not in chosen:
        raise ValueError(f"{', '.join(copying)} copy FORA's k per layer: include 'fora' in methods")
    seeds = list(seeds) if seeds else [setting.seed]
    points = _interleave(expand(setting.methods, chosen, setting.sweeps if sweep else None))
    out = Path(setting.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if setting.threads:
        torch.set_num_threads(setting.threads)
    log = RunLog(out, setting, resume)
    if log.other:
        print(
            f"compare --resume: {log.other} runs in {log.path} were made with another setting; they are run again",
            flush=True,
        )
    evaluator: Evaluator | None = None
    base: dict[str, float] = dict(log.numbers(None, None) or {})
    runs: dict[str, dict[int, Run]] = {p.key: {} for p in points}
    bar = tqdm(total=len(points) * len(seeds), desc=f"compare {setting.setting}", disable=not progress)
    for seed in seeds:
        seeded = replace(setting, seed=seed)
        dm: TextDataModule | None = None
        fora_ks: dict[str, int] | None = None
        for point in points:
            logged = log.numbers(point.key, seed, point.args)
            if logged is not None:
                run = Run(**logged)  # finished by an earlier invocation of this same setting
            else:
                if dm is None:
                    dm = TextDataModule(**{"seed": seed, **setting.data})
                    dm.setup("fit")
                if evaluator is None:
                    pl.seed_everything(seed, verbose=False)  # as in every run (matters only for a random init)
                    base_model = CausalLMModule(**setting.model).model.eval().requires_grad_(False)
                    evaluator = Evaluator(setting, dm.tokenizer, base_model, dm.add_bos, dm.append_eos, dm.max_length)
                    if not base:
                        base = evaluator.base_scores()
                        log.append(None, None, None, base)
                if progress:
                    tqdm.write(f"[seed {seed}] {point.key}")
                run = run_method(point.method, point.args, seeded, dm, evaluator, fora_ks, progress, point.key)
                log.append(point.key, seed, point.args, asdict(run))
            runs[point.key][seed] = run
            if point.key == "fora":
                fora_ks = run.ks
            bar.update()
            if not (seed == seeds[-1] and point is points[-1]):  # the last run's outputs are written below
                _write(setting, base, points, runs, seeds, sweep, out, progress=False)  # a crash keeps the runs done
    bar.close()
    return _write(setting, base, points, runs, seeds, sweep, out, progress)


def _interleave(points: Sequence[Point]) -> list[Point]:
    """Every method's own point, then each method's first swept point, then its second, ...: a compare stopped
    early (time limit, crash) has a full row of methods and the start of every method's sweep."""
    rank: dict[str, int] = {}
    order = []
    for p in points:
        order.append((0 if p.knob is None else 1 + rank.get(p.method, 0), len(order), p))
        if p.knob is not None:
            rank[p.method] = rank.get(p.method, 0) + 1
    return [p for *_, p in sorted(order, key=lambda t: t[:2])]


def _write(
    setting: Setting,
    base: dict[str, float],
    points: Sequence[Point],
    runs: Mapping[str, Mapping[int, Run]],
    seeds: Sequence[int],
    sweep: bool,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Write the outputs of the runs done so far (called after every run, so an interrupted compare keeps them)."""
    steps = int(setting.trainer.get("max_steps", -1))
    if len(seeds) == 1 and not sweep:
        return _write_single(setting, base, {k: r[seeds[0]] for k, r in runs.items() if r}, steps, out, progress)
    done = [p for p in points if runs[p.key]]
    rows = {p.key: {s: run_row(r, base) for s, r in runs[p.key].items()} for p in done}
    results = sweep_results(setting, base, done, rows, seeds)
    details = {
        "setting": setting.setting,
        "seeds": seeds,
        "max_steps": steps,
        "base": base,
        "config": asdict(setting),
        "runs": {
            key: {
                str(s): {"k": r.ks, **{k: v for k, v in r.scores.items() if k not in ("preserved", "new_task")}}
                for s, r in by_seed.items()
            }
            for key, by_seed in runs.items()
            if by_seed
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    write_csv(results, out / "results.csv")
    table = sweep_table(results, setting, steps)
    (out / "table.md").write_text(table + "\n")
    pareto_plot(results, setting, out / "pareto.png")
    if progress:
        print(
            "\n" + table + f"\n\nwritten to {out}/results.json, results.csv, details.json, table.md, pareto.png",
            flush=True,
        )
    return results


def _write_single(
    setting: Setting, base: dict[str, float], runs: Mapping[str, Run], steps: int, out: Path, progress: bool
) -> dict[str, Any]:
    """One seed, no sweep: results.json (the issue's shape), details.json, table.md, plot.png."""
    results = results_json(setting, base, runs)
    details = {
        "setting": setting.setting,
        "seed": setting.seed,
        "max_steps": steps,
        "base": base,
        "methods": {
            n: {"k": r.ks, **{k: v for k, v in r.scores.items() if k not in ("preserved", "new_task")}}
            for n, r in runs.items()
        },
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
    """``compare --config FILE [--max-steps N] [--methods a,b] [--output DIR] [--seeds 0 1 2] [--sweep] [--no-progress]``."""
    parser = argparse.ArgumentParser(
        prog="compare", description="Run FORA and the baselines on one setting and tabulate them."
    )
    parser.add_argument("--config", required=True, help="a compare YAML (see configs/compare_demo.yaml)")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps for every method")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--output", default=None, help="override output_dir")
    parser.add_argument("--limit", type=int, default=None, help="cap every evaluation set at this many items")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or table print")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run every point under each seed (mean and spread)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also run the config's sweeps: block (each method's own knob)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs the output directory's runs.jsonl holds for this same setting (an interrupted compare)",
    )
    args = parser.parse_args(argv)
    setting = load_setting(args.config)
    if args.max_steps is not None:
        setting.trainer = {**setting.trainer, "max_steps": args.max_steps}
    if args.output is not None:
        setting.output_dir = args.output
    if args.limit is not None:
        setting.cap_limits(args.limit)
    methods = args.methods.split(",") if args.methods else None
    compare(setting, methods, progress=not args.no_progress, seeds=args.seeds, sweep=args.sweep, resume=args.resume)
    return 0
