"""Calibration sufficiency on the offline demo: the held-out estimate alone, and the curve of kept / learned / KL
against calibration tokens (results/calibration_curve/, docs/calibration.md).

    python scripts/calibration_curve.py estimate     # the estimate only (calibration + 1 step) on narrow .. adequate data
    python scripts/calibration_curve.py curve --seeds 0   # full demo fits (python cli.py fit --config configs/demo.yaml)
    python scripts/calibration_curve.py extend       # prompts-only calibration, calibration_samples 0 vs 'auto'

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
        seconds = time.perf_counter() - start
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["estimate", "curve", "extend"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    a = parser.parse_args()
    if a.what == "estimate":
        estimate()
    elif a.what == "curve":
        curve(a.seeds, a.sizes)
    else:
        extend(a.seeds)


if __name__ == "__main__":
    main()
