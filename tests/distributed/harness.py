"""Launch ``_worker.py`` as N real processes (gloo on CPU), torchrun-style: each gets RANK/LOCAL_RANK/WORLD_SIZE."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORKER = Path(__file__).with_name("_worker.py")

REPO_ROOT = Path(__file__).resolve().parents[2]


def exit_cleanly() -> None:
    """End a worker that has written its results: destroy the process group, then skip the interpreter's static
    teardown, where gloo's threads occasionally end a finished rank with "terminate called without an active
    exception" (exit code 134, about one run in ten of the strategies file on 2 busy cores)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def every_rank(x: Any) -> list[Any]:
    """``x`` from every rank, by rank (``[x]`` without a process group or on one rank): a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [x]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, x)
    return every


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict[str, Any], tmp: Path, timeout: float = 90, worker: Path = WORKER) -> dict[str, Any]:
    """Run ``cfg`` on ``cfg["world"]`` processes of ``worker``; return rank 0's results. Fails with the ranks' stderr tails."""
    world = cfg["world"]
    cfg = {**cfg, "out": str(tmp / f"out-{os.getpid()}-{free_port()}.pt")}
    cfg_path = tmp / f"cfg-{free_port()}.json"
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            # the checkout's root first: workers import this checkout's fora_lightning and ``tests.*`` helpers
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        log = open(tmp / f"rank{rank}-{port}.log", "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    failed = []
    try:
        for rank, p in enumerate(procs):
            if p.wait(timeout=timeout) != 0:
                failed.append(rank)
    except subprocess.TimeoutExpired:
        failed = list(range(world))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        tails = []
        for rank in failed:
            logs[rank].seek(0)
            tails.append(f"--- rank {rank} ---\n" + logs[rank].read()[-3000:])
        raise RuntimeError(f"distributed run failed on ranks {failed}\n" + "\n".join(tails))
    for log in logs:
        log.close()
    return torch.load(cfg["out"], weights_only=False)
