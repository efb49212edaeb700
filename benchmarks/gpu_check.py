"""The distributed FORA checks of tests/distributed on GPUs with NCCL (one H200 is enough; under 5 minutes).

Runs DDP, FSDP2 (ModelParallelStrategy; fc2's 5 rows split unevenly when there are >= 2 GPUs) and FSDP1
(``use_orig_params`` true and false, checkpoint + resume) on ``min(2, #GPUs)`` processes with NCCL, and
compares bases, trained weights and leakage with a single-process float32 CPU run on the same global
batches. NCCL allows one process per GPU, so one GPU runs world size 1 (the sharded code paths with a
single shard, NCCL collectives of size 1); two or more GPUs run world size 2. TF32 is switched off.

    python benchmarks/gpu_check.py            # prints a table, exits non-zero on any failure
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed import _worker as W  # noqa: E402
from tests.distributed.harness import launch  # noqa: E402
from tests.distributed.test_strategies import SCENARIOS, STEPS, _assert_same_bases, _leakage  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    world = min(2, torch.cuda.device_count())
    tmp = Path(tempfile.mkdtemp(prefix="fora-gpu-"))
    scenarios = []
    for name, s in SCENARIOS.items():
        sc = {k: v for k, v in s.items() if k != "resume"}
        sc.update(name=name, steps=STEPS, accelerator="cuda")
        if s.get("resume") or s.get("save"):
            sc["save"] = str(tmp / f"{name}.ckpt")
        if s.get("resume"):
            sc.update(resume_from=sc["save"], resume_steps=2 * STEPS)
        scenarios.append(sc)
    t0 = time.time()
    runs = launch({"world": world, "scenarios": scenarios}, tmp, timeout=240)
    ref = {}
    for freeze in (True, False):
        ckpt = str(tmp / f"single-{freeze}.ckpt")
        ref[freeze] = W.run(
            {
                "strategy": "single",
                "world": 1,
                "steps": STEPS,
                "freeze_other": freeze,
                "save": ckpt,
                "resume_from": ckpt,
                "resume_steps": 2 * STEPS,
            }
        )
    failures = 0
    print(f"world size {world} on {torch.cuda.get_device_name(0)}, NCCL; {time.time() - t0:.0f} s")
    for name in SCENARIOS:
        r = runs[name]
        if "error" in r:
            print(f"{name:<34} ERROR\n{r['error']}")
            failures += 1
            continue
        freeze = SCENARIOS[name].get("freeze_other", True)
        for phase in [p for p in ("train", "resume") if p in r]:
            try:
                _assert_same_bases(r[phase]["fora"], ref[freeze][phase]["fora"], atol=1e-5)
                diff = max(
                    (r[phase]["weights"][n] - ref[freeze][phase]["weights"][n]).abs().max().item()
                    for n in ("fc1", "fc2")
                )
                leak = max(_leakage(r[phase]["weights"], r[phase]["fora"]).values())
                ok = diff < 1e-4 and leak < 1e-5
                print(
                    f"{name:<34} {phase:<7} max|W - W_single| {diff:.1e}  leakage {leak:.1e}  {'ok' if ok else 'FAIL'}"
                )
                failures += not ok
            except AssertionError as e:
                print(f"{name:<34} {phase:<7} FAIL {e}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    raise SystemExit(main())
