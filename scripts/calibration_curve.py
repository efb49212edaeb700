"""Calibration sufficiency on the offline demo and the SmolLM2 setting: the held-out estimate alone, and the curve of
kept / learned / KL against calibration tokens (results/calibration_curve/, docs/calibration.md).

    python scripts/calibration_curve.py estimate     # the estimate only (calibration + 1 step) on narrow .. adequate data
    python scripts/calibration_curve.py curve --seeds 0   # full demo fits (python cli.py fit --config configs/demo.yaml)
    python scripts/calibration_curve.py extend       # prompts-only calibration, calibration_samples 0 vs 'auto'
    python scripts/calibration_curve.py smollm2 --seeds 0 1   # FORA on configs/compare_smollm2.yaml, 64 .. 28k tokens
    python scripts/calibration_curve.py smollm2-estimate --seeds 0 1   # the estimate alone at those sizes, batches of 4
    python scripts/calibration_curve.py smollm2-extend --seeds 0 1   # its own data, calibration_samples 0 vs 'auto'
    python scripts/calibration_curve.py smollm2-cost   # its fit start (calibration + one step), estimate off vs on

Every run is seeded; rows go to results/calibration_curve/{estimate,curve,extend}.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ (smollm2: the compare harness)

OUT = Path("results/calibration_curve")
CALIB = "assets/demo/translation/calibration.jsonl"
PROMPTS_ONLY = [
    "--data.init_args.preserve",
    json.dumps({"path": CALIB, "prompt_field": None, "response_field": "prompt"}),
]
SIZES = [4, 8, 16, 32, 64, 128, 200]


def _write(name: str, rows: list[dict[str, Any]], command: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (OUT / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def _one_step_fit(module: Any, dm: Any, cb: Any) -> float:
    """Seconds of a one-step CPU fit with ``cb``, nothing logged: calibration, bases, sentinel capture, one step."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[cb],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def _estimate_one(
    rows: list[dict[str, str]], batch_size: int, samples: int | str = 0, holdout: int = 8
) -> dict[str, Any]:
    """Calibrate the demo model on ``rows`` (prompt/response dicts), one optimizer step; the estimate's summary."""
    import tempfile

    import lightning.pytorch as pl

    from fora_lightning import FORA
    from fora_lightning.llm import CausalLMModule, TextDataModule
    from fora_lightning.llm.sources import TextSource

    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dm = TextDataModule(
            tokenizer="assets/demo/model",
            task=TextSource(path="assets/demo/scan/train.jsonl"),
            preserve=TextSource(path=str(path), prompt_field=None, response_field="text"),
            preserve_val_size=0,
            batch_size=32,
            calibration_batch_size=batch_size,
            max_length=64,
            cache_dir=tmp,
        )
        cb = FORA(energy=0.99, weight_rank=0, progress=False, calibration_samples=samples, calibration_holdout=holdout)
        module = CausalLMModule(model="assets/demo/model", lr=0.0, num_threads=1)
        seconds = _one_step_fit(module, dm, cb)
    if not holdout:
        return {"fit_s": round(seconds, 1)}
    s = cb.protection.sufficiency["default"].summary()
    before = s.pop("before_samples", None)
    if before is not None:  # 'auto' extended the data: what decided it
        s["auto_extended"] = True
        s["before_ratio_max"] = before.get("ratio_max")
        own = before.get("own_continuations") or {}
        s["own_continuations_ratio_max"] = own.get("ratio_max")
    return {**s, "fit_s": round(seconds, 1)}


def estimate() -> None:
    """Narrow to adequate calibration sets, calibration batch 8 (so that small sets have several batches)."""
    data = [json.loads(line) for line in Path(CALIB).read_text().splitlines()]
    full = [{"text": f"{r['prompt']} {r['response']}"} for r in data]
    prompts = [{"text": r["prompt"]} for r in data]
    words = data[0]["prompt"].split()  # translate : w1 w2 w3 =
    swaps = [r["prompt"].split()[2] for r in data[1:5]]
    near = [{"text": " ".join([*words[:-2], w, "="])} for w in swaps] * 8  # 4 prompts one word apart, 8 times each
    distinct = [{"text": " ".join([*words[:-2], r["prompt"].split()[2], "="])} for r in data[1:17]]
    cases = {
        "near-duplicate prompts (32 rows, 4 distinct, each 8 times)": (near, 0),
        "near-duplicate prompts (16 rows, one source word apart)": (distinct, 0),
        "prompts only, 256 rows": (prompts, 0),
        "prompts only, 256 rows, calibration_samples='auto'": (prompts, "auto"),
        "prompt + own continuation, 200 rows, calibration_samples='auto'": (full[:200], "auto"),
        **{f"prompt + own continuation, {n} rows": (full[:n], 0) for n in SIZES if n >= 16},
    }
    rows = []
    for name, (rs, samples) in cases.items():
        r = {"data": name, "rows": len(rs), **_estimate_one(rs, 8, samples)}
        print(json.dumps(r), flush=True)
        rows.append(r)
    for holdout in (0, 8):  # the fit-start cost of the estimate (calibration + one step), 200 rows
        seconds = min(_estimate_one(full[:200], 8, 0, holdout)["fit_s"] for _ in range(3))
        rows.append({"data": f"cost: 200 rows, calibration_holdout={holdout} (best of 3)", "fit_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    _write("estimate", rows, "python scripts/calibration_curve.py estimate")


def _fit(args: list[str], root: Path) -> dict[str, Any]:
    """One ``python cli.py fit --config configs/demo.yaml`` run: kept / learned exact match, KL, the estimate."""
    cmd = [sys.executable, "cli.py", "fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(root)]
    start = time.perf_counter()
    subprocess.run([*cmd, *args], check=True, capture_output=True)
    wall = time.perf_counter() - start
    run = max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    report = json.loads((run / "report.json").read_text())
    fora = json.loads((run / "fora_report.json").read_text())["summary"]
    calibration = fora.get("calibration", {}).get("default", {})
    return {
        "kept": report["preserved"]["after"],
        "learned": report["new_task"]["after"],
        "kl": fora.get("kl"),
        "leakage_max": fora.get("leakage_max"),
        "held_out_share_min": calibration.get("held_out_share_min"),
        "ratio_max": calibration.get("ratio_max"),
        "tokens": calibration.get("tokens"),
        "tokens_needed": calibration.get("tokens_needed"),
        "verdict": calibration.get("verdict"),
        "wall_s": round(wall, 1),
    }


def curve(seeds: list[int], sizes: list[int]) -> None:
    rows = []
    for seed in seeds:
        for n in sizes:
            args = [
                "--seed_everything",
                str(seed),
                "--data.init_args.calibration_size",
                str(n),
                "--data.init_args.calibration_batch_size",
                "8",
            ]
            r = {"seed": seed, "calibration_rows": n, **_fit(args, Path(f"runs/calibration_curve/s{seed}_n{n}"))}
            print(json.dumps(r), flush=True)
            rows.append(r)
    sizes_arg = " ".join(map(str, sizes))
    seeds_arg = " ".join(map(str, seeds))
    name = "curve_seed" + "_".join(map(str, seeds))
    _write(name, rows, f"python scripts/calibration_curve.py curve --seeds {seeds_arg} --sizes {sizes_arg}")


def extend(seeds: list[int]) -> None:
    rows = []
    cases = {
        "prompts only, calibration_samples=0": [],
        "prompts only, calibration_samples='auto'": ["--model.init_args.config.calibration_samples", "auto"],
        "prompt + own continuation (the demo), calibration_samples=0": None,
    }
    for seed in seeds:
        for label, extra in cases.items():
            if extra is None and seed != 0:
                continue  # the curve's 200-row runs are the demo's other seeds
            args = ["--seed_everything", str(seed), "--data.init_args.calibration_batch_size", "8"]
            args += PROMPTS_ONLY + extra if extra is not None else []
            r = {"seed": seed, "data": label, **_fit(args, Path(f"runs/calibration_curve/extend_s{seed}_{len(rows)}"))}
            print(json.dumps(r), flush=True)
            rows.append(r)
    seeds_arg = " ".join(map(str, seeds))
    _write(
        "extend_seed" + "_".join(map(str, seeds)),
        rows,
        f"python scripts/calibration_curve.py extend --seeds {seeds_arg}",
    )


SMOLLM2_POOL = Path("runs/smollm2/calibration_pool")
SMOLLM2_SIZES = [2, 8, 32, 128, 512, 912]  # rows of the 912-row pool: about 60 .. 28k tokens
FORMS_EXTRA = [
    "What should I know before I {}?",
    "What mistakes do people make when they {}?",
    "How do I {} on a budget?",
]
TOPICS_EXTRA = [
    "learn to swim",
    "grow tomatoes",
    "write a short story",
    "wake up earlier",
    "cook rice",
    "knit a scarf",
    "start a podcast",
    "learn to draw",
    "meditate",
    "build a birdhouse",
    "sew a button",
    "learn chess",
]


def smollm2_pool() -> None:
    """A larger calibration pool of the SmolLM2 setting's two capabilities, built as scripts/smollm2_setting.py builds
    the committed one (which it contains): 768 two-shot addition prompts (the committed 128, then 640 drawn with
    seed 1) and 144 chat questions (3 more question forms, 12 more topics, none of the test's) with the base model's
    own greedy answers. Written to runs/smollm2/calibration_pool/ (not committed: rebuilt in about 2 minutes)."""
    import random

    import smollm2_setting as s  # scripts/ is on sys.path when this file runs as a script
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fora_lightning.llm.generation import generate_greedy

    assert not set(TOPICS_EXTRA) & set(s.TOPICS_TEST) and not set(FORMS_EXTRA) & set(s.FORMS_TEST)
    torch.set_num_threads(2)
    committed = Path("assets/smollm2/arithmetic/calibration.jsonl").read_text().splitlines()
    rng = random.Random(1)
    extra = [json.dumps({"prompt": s.addition_prompt(rng)[0]}) for _ in range(640)]
    SMOLLM2_POOL.mkdir(parents=True, exist_ok=True)
    (SMOLLM2_POOL / "arithmetic.jsonl").write_text("\n".join(committed + extra) + "\n")
    model = AutoModelForCausalLM.from_pretrained("runs/smollm2/model").eval()
    tok = AutoTokenizer.from_pretrained("runs/smollm2/model")
    forms, topics = s.FORMS_CALIB + FORMS_EXTRA, s.TOPICS_CALIB + TOPICS_EXTRA
    questions = [f.format(t) for f in forms for t in topics]
    prompts = [
        tok.apply_chat_template(s.chat_messages(q), tokenize=False, add_generation_prompt=True) for q in questions
    ]
    answers = generate_greedy(model, tok, prompts, batch_size=12, max_new_tokens=32)
    rows = [json.dumps({"messages": s.chat_messages(q, a)}) for q, a in zip(questions, answers)]
    (SMOLLM2_POOL / "dialogue.jsonl").write_text("\n".join(rows) + "\n")
    print(f"{len(committed) + len(extra)} addition prompts, {len(rows)} chat rows in {SMOLLM2_POOL}", flush=True)


def _smollm2_fora(setting: Any, seeds: list[int], **row: Any) -> list[dict[str, Any]]:
    """FORA alone on ``setting`` (a compare of the SmolLM2 config) under ``seeds``; one row per seed from the
    compare's runs.jsonl, the fit-start estimate included."""
    from experiments.compare import compare

    compare(setting, ["fora"], progress=False, seeds=seeds)
    lines = [json.loads(x) for x in (Path(setting.output_dir) / "runs.jsonl").read_text().splitlines()]
    base = next(x["numbers"] for x in lines if x["key"] is None)
    rows = []
    for line in (x for x in lines if x["key"] == "fora"):
        run = line["numbers"]
        c = run["calibration"].get("default", {})
        before = c.get("before_samples") or {}
        r = {
            "seed": line["seed"],
            **row,
            "tokens": c.get("tokens"),
            "kept": run["scores"]["preserved"],
            "kept_base": base["preserved"],
            "learned": run["scores"]["new_task"],
            "kl": run["scores"]["preservation"]["kl"],
            "dialogue_perplexity": run["scores"].get("extra/dialogue"),
            "dialogue_perplexity_base": base.get("extra/dialogue"),
            "leakage_mean": run["scores"]["preservation"]["leakage_mean"],
            "k_mean": sum(run["ks"].values()) / max(len(run["ks"]), 1),
            "held_out_share_min": c.get("held_out_share_min"),
            "ratio_max": c.get("ratio_max"),
            "short_layers": c.get("short_layers"),
            "tokens_needed": c.get("tokens_needed"),
            "verdict": c.get("verdict"),
            **({"before_ratio_max": before.get("ratio_max"), "before_tokens": before.get("tokens")} if before else {}),
            "wall_s": run["wall_s"],
        }
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def _pool_data(n: int) -> dict[str, Any]:
    """TextDataModule arguments: the pool's two capabilities as the setting's preserve sources, the first ``n`` rows."""
    return {
        "preserve": [
            {"path": str(SMOLLM2_POOL / "arithmetic.jsonl"), "prompt_field": None, "response_field": "prompt"},
            {"path": str(SMOLLM2_POOL / "dialogue.jsonl"), "messages_field": "messages"},
        ],
        "calibration_size": n,
    }


def smollm2(seeds: list[int], sizes: list[int]) -> None:
    """FORA alone (the config's own arguments) through the compare harness, on the first N rows of the shuffled pool
    (shuffled with the seed); one compare per size (output runs/calibration_curve/smollm2_nN/)."""
    from experiments.setting import load_setting

    if not (SMOLLM2_POOL / "dialogue.jsonl").is_file():
        smollm2_pool()
    rows = []
    for n in sizes:
        setting = load_setting("configs/compare_smollm2.yaml")
        setting.data = {**setting.data, **_pool_data(n)}
        setting.output_dir = f"runs/calibration_curve/smollm2_n{n}"
        rows += _smollm2_fora(setting, seeds, calibration_rows=n)
    _write(
        "smollm2_seed" + "_".join(map(str, seeds)),
        rows,
        f"python scripts/calibration_curve.py smollm2 --seeds {' '.join(map(str, seeds))} "
        f"--sizes {' '.join(map(str, sizes))}",
    )


def smollm2_estimate(seeds: list[int], sizes: list[int]) -> None:
    """The fit-start estimate alone (calibration + one step) on the curve's calibration sets, in batches of 4 rows so
    that small sets have a hold-out slice (the curve's compare calibrates in batches of 32: one batch below 64 rows)."""
    import lightning.pytorch as pl

    from experiments.setting import load_setting
    from fora_lightning import FORA
    from fora_lightning.llm import CausalLMModule, TextDataModule

    setting = load_setting("configs/compare_smollm2.yaml")
    rows = []
    for seed in seeds:
        for n in sizes:
            dm = TextDataModule(**{**setting.data, **_pool_data(n), "calibration_batch_size": 4, "seed": seed})
            pl.seed_everything(seed, verbose=False)
            cb = FORA(**setting.methods["fora"], target_modules=setting.target_modules, progress=False)
            seconds = _one_step_fit(CausalLMModule(**{**setting.model, "lr": 0.0}), dm, cb)
            s = cb.protection.sufficiency["default"].summary()
            r = {"seed": seed, "calibration_rows": n, **s, "fit_s": round(seconds, 1)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    _write(
        "smollm2_estimate",
        rows,
        f"python scripts/calibration_curve.py smollm2-estimate --seeds {' '.join(map(str, seeds))} "
        f"--sizes {' '.join(map(str, sizes))}",
    )


def smollm2_extend(seeds: list[int]) -> None:
    """The committed SmolLM2 setting (its 164 calibration rows), FORA with calibration_samples 0 and 'auto'."""
    from experiments.setting import load_setting

    rows = []
    for samples in (0, "auto"):
        setting = load_setting("configs/compare_smollm2.yaml")
        setting.methods = {"fora": {**setting.methods["fora"], "calibration_samples": samples}}
        setting.output_dir = f"runs/calibration_curve/smollm2_samples_{samples}"
        rows += _smollm2_fora(setting, seeds, calibration_samples=samples)
    _write(
        "smollm2_extend_seed" + "_".join(map(str, seeds)),
        rows,
        f"python scripts/calibration_curve.py smollm2-extend --seeds {' '.join(map(str, seeds))}",
    )


def smollm2_cost(repeats: int = 3) -> None:
    """Fit start (calibration, bases, sentinel capture and one optimizer step) on the SmolLM2 setting with its own
    data, the estimate off (calibration_holdout=0) and on (8), alternated, best of ``repeats``."""
    import lightning.pytorch as pl
    import torch

    from experiments.setting import load_setting
    from fora_lightning import FORA
    from fora_lightning.llm import CausalLMModule, TextDataModule

    setting = load_setting("configs/compare_smollm2.yaml")
    torch.set_num_threads(setting.threads or 2)
    dm = TextDataModule(**setting.data)
    dm.setup("fit")
    seconds: dict[int, list[float]] = {0: [], 8: []}
    for _ in range(repeats):
        for holdout in seconds:
            pl.seed_everything(0, verbose=False)
            module = CausalLMModule(**setting.model)
            cb = FORA(
                **setting.methods["fora"],
                target_modules=setting.target_modules,
                calibration_holdout=holdout,
                progress=False,
            )
            seconds[holdout].append(_one_step_fit(module, dm, cb))
            print(
                json.dumps({"calibration_holdout": holdout, "fit_start_s": round(seconds[holdout][-1], 2)}), flush=True
            )
    rows = [
        {"calibration_holdout": h, "best_s": round(min(t), 2), "all_s": [round(x, 2) for x in t]}
        for h, t in seconds.items()
    ]
    _write("smollm2_cost", rows, f"python scripts/calibration_curve.py smollm2-cost  # {repeats} alternated repeats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what", choices=["estimate", "curve", "extend", "smollm2", "smollm2-estimate", "smollm2-extend", "smollm2-cost"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    a = parser.parse_args()
    if a.what == "estimate":
        estimate()
    elif a.what == "curve":
        curve(a.seeds, a.sizes or SIZES)
    elif a.what == "smollm2":
        smollm2(a.seeds, a.sizes or SMOLLM2_SIZES)
    elif a.what == "smollm2-estimate":
        smollm2_estimate(a.seeds, a.sizes or SMOLLM2_SIZES)
    elif a.what == "smollm2-extend":
        smollm2_extend(a.seeds)
    elif a.what == "smollm2-cost":
        smollm2_cost()
    else:
        extend(a.seeds)


if __name__ == "__main__":
    main()
