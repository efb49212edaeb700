"""Compare FORA with the baselines on one setting: same model, data, seed and step budget for every method.

``python cli.py compare --config configs/compare_demo.yaml [--max-steps N] [--methods fora,plain_ft] [--output DIR]``

Methods (run in this order; ``fora`` first, since ``weight_projection`` and ``random`` copy its k per layer):

============================  ==============================================================================
``fora``                      :class:`~fora_lightning.FORA` (``source="activations"``), full fine-tuning
``plain_ft``                  :class:`~fora_lightning.eval.baselines.TrainTargetsOnly`: the same weights, unconstrained
``lora``                      plain LoRA = :class:`~fora_lightning.ForaLoRA` with no bases (k = 0, r = 0)
``l2sp`` / ``ewc``            :class:`~fora_lightning.eval.l2sp.L2SP`, :class:`~fora_lightning.eval.ewc.EWC`
``weight_projection``         FORA with ``source="weights"`` (top right singular vectors of W0), FORA's k per layer
``random``                    FORA with ``source="random"`` (a random k-frame), FORA's k per layer
``fora_lora``                 :class:`~fora_lightning.ForaLoRA`
============================  ==============================================================================

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch import Callback
from torch import nn
from tqdm.auto import tqdm

from fora_lightning.callback import FORA
from fora_lightning.eval.baselines import TrainTargetsOnly
from fora_lightning.eval.ewc import EWC
from fora_lightning.eval.generation import generate_greedy, read_pairs
from fora_lightning.eval.l2sp import L2SP
from fora_lightning.eval.metrics import CausalPerplexity, ExactMatch
from fora_lightning.eval.preservation import evaluate_preservation, model_target_names
from fora_lightning.llm import CausalLMModule, TextDataModule
from fora_lightning.llm.encoding import PadCollator, encode_pairs
from fora_lightning.lora import ForaLoRA, merge_lora, trainable_parameters

METHODS = ("fora", "plain_ft", "lora", "l2sp", "ewc", "weight_projection", "random", "fora_lora")
DISPLAY_ORDER = ("plain_ft", "lora", "l2sp", "ewc", "weight_projection", "random", "fora", "fora_lora")
LABELS = {
    "plain_ft": "plain fine-tuning", "lora": "LoRA", "l2sp": "L2-SP", "ewc": "EWC",
    "weight_projection": "weight-space projection (matched k)", "random": "random subspace (matched k)",
    "fora": "FORA", "fora_lora": "FORA-LoRA",
}
MARKERS = {"plain_ft": "o", "lora": "s", "l2sp": "^", "ewc": "v", "weight_projection": "D", "random": "X", "fora": "*", "fora_lora": "P"}
METRICS = ("exact_match", "perplexity")


# ------------------------------------------------------------------------------------------ config
@dataclass
class EvalSet:
    """A JSON-lines file of prompt/answer pairs scored by greedy exact match or by response perplexity."""

    path: str
    name: str = ""
    metric: str = "exact_match"
    limit: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 64
    prompt_field: str = "prompt"
    answer_field: str = "response"
    stop: str | None = None  # cut generations at the first occurrence (e.g. "\n" after a few-shot answer)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"evaluation metric must be one of {METRICS}, got {self.metric!r} ({self.path})")
        self.name = self.name or Path(self.path).parent.name or Path(self.path).stem

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "exact_match"

    @property
    def label(self) -> str:
        return f"{self.name} {self.metric.replace('_', ' ')}"


@dataclass
class Setting:
    """One comparison: the shared model, data, trainer and evaluation, and the methods' own arguments."""

    setting: str
    model: dict[str, Any]
    data: dict[str, Any]
    preserved: EvalSet
    new_task: EvalSet
    heldout: EvalSet
    methods: dict[str, dict[str, Any]]
    target_modules: list[str] | str
    trainer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, EvalSet] = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "results"
    threads: int | None = None

    def cap_limits(self, limit: int) -> None:
        """At most ``limit`` items in every evaluation set."""
        for s in (self.preserved, self.new_task, self.heldout, *self.extra.values()):
            s.limit = min(s.limit or limit, limit)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Setting:
        cfg = dict(cfg)
        unknown = set(cfg) - {"setting", "model", "data", "evaluation", "methods", "target_modules", "trainer", "seed", "output_dir", "threads"}
        if unknown:
            raise ValueError(f"compare config: unknown keys {sorted(unknown)}")
        ev = dict(cfg.pop("evaluation"))
        missing = {"preserved", "new_task"} - set(ev)
        if missing:
            raise ValueError(f"compare config: evaluation needs {sorted(missing)}")
        preserved = EvalSet(**ev.pop("preserved"))
        new_task = EvalSet(**ev.pop("new_task"))
        heldout = EvalSet(**ev.pop("heldout")) if "heldout" in ev else replace(preserved)
        extra = {name: EvalSet(**{"name": name, **spec}) for name, spec in (ev.pop("extra", None) or {}).items()}
        if ev:
            raise ValueError(f"compare config: unknown evaluation keys {sorted(ev)}")
        methods = {name: dict(args or {}) for name, args in cfg.pop("methods").items()}
        bad = set(methods) - set(METHODS)
        if bad:
            raise ValueError(f"compare config: unknown methods {sorted(bad)}; choose from {METHODS}")
        if {"weight_projection", "random"} & set(methods) and "fora" not in methods:
            raise ValueError("weight_projection and random copy FORA's k per layer: include 'fora' in methods")
        return cls(preserved=preserved, new_task=new_task, heldout=heldout, extra=extra, methods=methods, **cfg)


def load_setting(path: str | Path) -> Setting:
    with open(path, encoding="utf-8") as f:
        return Setting.from_dict(yaml.safe_load(f))


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


# ------------------------------------------------------------------------------------------ methods
def build_callback(name: str, args: dict[str, Any], targets: list[str] | str, fora_ks: Mapping[str, int] | None) -> Callback:
    """The Callback that makes plain ``CausalLMModule`` training into method ``name``."""
    args = {"target_modules": targets, **args}
    if name in ("fora", "weight_projection", "random", "fora_lora"):
        args.setdefault("progress", False)
    if name == "plain_ft":
        return TrainTargetsOnly(**args)
    if name == "l2sp":
        return L2SP(**args)
    if name == "ewc":
        return EWC(**{"progress": False, **args})
    if name == "fora":
        return FORA(**args)
    if name == "fora_lora":
        return ForaLoRA(**args)
    if name == "lora":  # plain LoRA: FORA-LoRA with an empty protected input span (k = 0) and no channel (r = 0)
        return ForaLoRA(**{**args, "source": "none", "weight_rank": 0})
    if fora_ks is None:
        raise ValueError(f"{name} needs FORA's per-layer k: run 'fora' first")
    source = "weights" if name == "weight_projection" else "random"
    return FORA(**{**args, "source": source, "rank": dict(fora_ks)})


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


# ------------------------------------------------------------------------------------------ outputs
def results_json(setting: Setting, base: dict[str, Any], runs: Mapping[str, Run]) -> dict[str, Any]:
    """The issue's shape: setting, metric names, directions and one entry per method."""
    return {
        "setting": setting.setting,
        "preserved_metric": setting.preserved.label,
        "new_task_metric": setting.new_task.label,
        "higher_is_better": {"preserved": setting.preserved.higher_is_better, "new_task": setting.new_task.higher_is_better},
        "methods": {
            name: {
                "preserved": run.scores["preserved"],
                "preserved_base": base["preserved"],
                "new_task": run.scores["new_task"],
                "kl": run.scores["preservation"]["kl"],
                "leakage": run.scores["preservation"]["leakage_mean"],
                "trainable_params": run.trainable_params,
                "wall_s": round(run.wall_s, 2),
                "k_mean": sum(run.ks.values()) / len(run.ks) if run.ks else 0.0,
            }
            for name, run in sorted(runs.items(), key=lambda kv: DISPLAY_ORDER.index(kv[0]))
        },
    }


def _fmt(value: float, metric: str) -> str:
    return f"{100 * value:.1f}%" if metric == "exact_match" else f"{value:.3f}"


def format_table(results: dict[str, Any], setting: Setting, base: dict[str, Any], runs: Mapping[str, Run], steps: int) -> str:
    """Markdown: method x {new task, preserved (change), extras, KL, leakage, trainable params, wall time, k}."""
    pm, nm = setting.preserved.metric, setting.new_task.metric
    extra = list(setting.extra.values())
    head = ["method", f"new task: {setting.new_task.label}", f"preserved: {setting.preserved.label}", "change"]
    head += [f"preserved: {e.label}" for e in extra] + ["KL(base‖tuned)", "leakage", "trainable params", "wall s", "k mean"]
    lines = [
        f"Setting `{setting.setting}`, seed {setting.seed}, {steps} optimizer steps per method. "
        f"Base model: new task {_fmt(base['new_task'], nm)}, preserved {_fmt(base['preserved'], pm)}"
        + "".join(f", {e.label} {_fmt(base[f'extra/{e.name}'], e.metric)}" for e in extra) + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for name, r in results["methods"].items():
        change = r["preserved"] - r["preserved_base"]
        change_s = f"{100 * change:+.1f} pt" if pm == "exact_match" else f"{change:+.3f}"
        cells = [LABELS[name], _fmt(r["new_task"], nm), _fmt(r["preserved"], pm), change_s]
        cells += [_fmt(runs[name].scores[f"extra/{e.name}"], e.metric) for e in extra]
        cells += [f"{r['kl']:.4f}", f"{r['leakage']:.4f}", f"{r['trainable_params']:,}", f"{r['wall_s']:.1f}",
                  f"{r['k_mean']:.1f}" if r["k_mean"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "KL: mean per-token KL(base ‖ tuned) in nats on held-out preserved text; leakage: mean over target layers of "
              "‖(W − W0) X‖ / ‖W0 X‖ with X the layer's inputs in the base model on that text; k mean: protected input "
              "directions per layer (weight projection and random copy FORA's k layer by layer)."]
    return "\n".join(lines)


def plot(results: dict[str, Any], setting: Setting, path: Path) -> None:
    """Preservation (y) against the new task (x), one labelled point per method, the base model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = {m: (100.0 if m == "exact_match" else 1.0) for m in METRICS}
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    methods = results["methods"]
    for i, (name, r) in enumerate(methods.items()):
        x, y = r["new_task"] * scale[setting.new_task.metric], r["preserved"] * scale[setting.preserved.metric]
        color = f"C{i}"  # baselines hollow, each its own marker, so that coinciding points stay visible
        ax.scatter(x, y, s=140 if name.startswith("fora") else 70, marker=MARKERS[name], label=LABELS[name], zorder=3,
                   facecolors=color if name.startswith("fora") else "none", edgecolors=color, linewidths=1.5)
    base = next(iter(methods.values()))["preserved_base"] * scale[setting.preserved.metric]
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (preserved)")
    unit = {"exact_match": " (%)", "perplexity": ""}
    ax.set_xlabel(f"new task: {setting.new_task.label}{unit[setting.new_task.metric]}"
                  + ("" if setting.new_task.higher_is_better else " (lower is better)"))
    ax.set_ylabel(f"preserved: {setting.preserved.label}{unit[setting.preserved.metric]}"
                  + ("" if setting.preserved.higher_is_better else " (lower is better)"))
    ax.set_title(f"{setting.setting}: preservation vs new task")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
