"""FORA and plain fine-tuning on the embedded demo under each Lightning precision, on one GPU.

Runs ``configs/compare_demo.yaml`` (tiny Llama: translation kept, SCAN learned) for the methods
``fora`` and ``plain_ft`` once per precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``),
training on the accelerator; Lightning hands the model back on CPU, where it is scored as in
``cli.py compare``. Writes ``results/gpu_precision/{results.json,table.md}``.

    python benchmarks/gpu_precision.py                                   # CUDA, 150 steps each
    python benchmarks/gpu_precision.py --accelerator cpu --precisions 32-true,bf16-true --max-steps 3 --limit 8
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.compare import compare  # noqa: E402
from experiments.setting import load_setting  # noqa: E402

COLUMNS = ("preserved", "new_task", "kl", "leakage", "wall_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "compare_demo.yaml"))
    ap.add_argument("--accelerator", default="cuda")
    ap.add_argument("--precisions", default="32-true,bf16-mixed,16-mixed,bf16-true")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="cap every evaluation set at this many items")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_precision")
    args = ap.parse_args()
    base_setting = load_setting(args.config)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for precision in args.precisions.split(","):
        setting = copy.deepcopy(base_setting)
        setting.trainer = {**setting.trainer, "accelerator": args.accelerator, "devices": 1, "precision": precision}
        if args.max_steps is not None:
            setting.trainer["max_steps"] = args.max_steps
        if args.limit is not None:
            setting.cap_limits(args.limit)
        setting.output_dir = str(args.out / precision)
        result = compare(setting, ["fora", "plain_ft"], progress=False)
        rows[precision] = {m: {c: r[c] for c in COLUMNS} for m, r in result["methods"].items()}
        print(precision, json.dumps(rows[precision]), flush=True)
    device = torch.cuda.get_device_name(0) if args.accelerator in ("cuda", "gpu") else "cpu"
    steps = base_setting.trainer.get("max_steps") if args.max_steps is None else args.max_steps
    lines = [
        f"Demo setting, {steps} steps, seed {base_setting.seed}, trained on {device} (torch {torch.__version__}); "
        f"preserved = translation exact match, new task = SCAN exact match.",
        "",
        "| precision | method | preserved | new task | KL(base‖tuned) | leakage | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for precision, methods in rows.items():
        for m, r in methods.items():
            lines.append(
                f"| {precision} | {m} | {100 * r['preserved']:.1f}% | {100 * r['new_task']:.1f}% | "
                f"{r['kl']:.4f} | {r['leakage']:.4f} | {r['wall_s']:.1f} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"device": device, "torch": torch.__version__, "steps": steps, "precisions": rows}, indent=2) + "\n"
    )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
