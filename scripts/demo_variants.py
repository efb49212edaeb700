"""FORA variants on one compare setting: one process, the base model scored once, each variant a fresh seeded fit.

    python scripts/demo_variants.py --config configs/compare_demo.yaml --output results/demo_bounded \\
        --variant "r8=fora:weight_rank=8" --variant "r8_tau0.05=fora:weight_rank=8,channel_bound=0.05"

A variant is ``label=method:key=value,...`` (values parsed as YAML; the method's args from the config are the
start). Writes ``results.json`` (label -> scores, args, mean leakage, k mean) and ``table.md`` to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.compare import Evaluator, run_method  # noqa: E402
from experiments.setting import load_setting  # noqa: E402
from fora_lightning.llm import CausalLMModule, TextDataModule  # noqa: E402


def parse_variant(text: str) -> tuple[str, str, dict]:
    label, _, rest = text.partition("=")
    method, _, pairs = rest.partition(":")
    args = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        args[key] = yaml.safe_load(value)
    return label, method, args


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    a = parser.parse_args()
    setting = load_setting(a.config)
    if a.max_steps is not None:
        setting.trainer = {**setting.trainer, "max_steps": a.max_steps}
    setting.output_dir = a.output
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(setting.threads or 1)
    dm = TextDataModule(**{"seed": setting.seed, **setting.data})
    dm.setup("fit")
    pl.seed_everything(setting.seed, verbose=False)
    base_model = CausalLMModule(**setting.model).model.eval().requires_grad_(False)
    evaluator = Evaluator(setting, dm.tokenizer, base_model, dm.add_bos, dm.append_eos, dm.max_length)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("base", {k: evaluator.score(base_model, k) for k in ("preserved", "new_task")})
    for text in a.variant:
        label, method, overrides = parse_variant(text)
        args = {**setting.methods.get(method, {}), **overrides}
        run = run_method(method, args, setting, dm, evaluator, None, progress=False)
        pres = run.scores["preservation"]
        results[label] = {
            "method": method,
            "args": args,
            "preserved": run.scores["preserved"],
            "new_task": run.scores["new_task"],
            "kl": pres.get("kl"),
            "leakage": pres.get("leakage_mean"),
            "k_mean": sum(run.ks.values()) / max(len(run.ks), 1),
            "wall_s": round(run.wall_s, 1),
            "max_steps": setting.trainer.get("max_steps"),
        }
        print(label, json.dumps({k: results[label][k] for k in ("preserved", "new_task", "kl", "leakage")}), flush=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    rows = [
        "| variant | method | args | SCAN | translation | KL | leakage | k mean | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        if label == "base":
            continue
        args = ", ".join(f"{k}={v}" for k, v in r["args"].items() if k != "model")
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        leak = "-" if r["leakage"] is None else f"{r['leakage']:.4f}"
        rows.append(
            f"| {label} | {r['method']} | {args} | {100 * r['new_task']:.1f}% | {100 * r['preserved']:.1f}% | {kl} | {leak} | {r['k_mean']:.1f} | {r['wall_s']} |"
        )
    (out / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
