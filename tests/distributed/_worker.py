"""One rank of distributed FORA runs (launched by tests/distributed/harness.py; :func:`run` is also the reference).

``python _worker.py CONFIG.json``: for each scenario, trains ``Net`` with the FORA Callback under its
strategy for ``steps`` AdamW steps, optionally saves a checkpoint and resumes from one, and (rank 0)
writes the full trained weights and the Callback's state to ``out``. The global batch is always 32
(``32 // world`` per rank), so every world size sees the same global batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fora_lightning import FORA
from fora_lightning.protection import Protection
from tests.distributed.harness import every_rank, exit_cleanly

D_IN, D_HID, D_OUT, SPAN, GLOBAL_BATCH, N_TASK = 16, 24, 5, 5, 32, 256  # fc2: 5 rows -> 3 + 2 over 2 ranks


class Net(pl.LightningModule):
    """fc1 -> tanh -> fc2, MSE; AdamW with weight decay. ``fsdp2``: ``fully_shard`` each Linear, then the root.

    ``lazy``: the same Linears (same initial weights) are attached only in ``configure_model``, as large models are built.
    """

    def __init__(self, fsdp2: bool = False, lazy: bool = False, lr: float = 3e-2, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.fsdp2, self.lr, self.weight_decay = fsdp2, lr, weight_decay
        self.no_grad_forwards = (
            0  # completed forwards outside training (calibration's): the early stop ends them sooner
        )
        layers = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_OUT)
        self._lazy_layers = list(layers) if lazy else []  # a plain list: not registered until configure_model
        if not lazy:
            self.fc1, self.fc2 = layers

    def configure_model(self) -> None:
        if self._lazy_layers and not hasattr(self, "fc1"):
            self.fc1, self.fc2 = self._lazy_layers
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.fc1, mesh=mesh)
        fully_shard(self.fc2, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        self.no_grad_forwards += not torch.is_grad_enabled()
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def span_basis() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D_IN, SPAN, generator=torch.Generator().manual_seed(0)))
    return q


def span_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, SPAN, generator=torch.Generator().manual_seed(seed)) @ span_basis().T


def task_loader(world: int) -> DataLoader:
    """Global batch ``i`` is samples ``32 i .. 32 i + 31`` for every world size (rank r: every world-th of them).

    Lightning's own distributed sampler would shuffle; the Trainer gets ``use_distributed_sampler=False``.
    """
    gen = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(N_TASK, D_IN, generator=gen), 3 * torch.randn(N_TASK, D_OUT, generator=gen))
    if world == 1:
        return DataLoader(ds, batch_size=GLOBAL_BATCH, shuffle=False)
    sampler = DistributedSampler(ds, num_replicas=world, rank=int(os.environ["RANK"]), shuffle=False)
    return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def calibration_loader() -> DataLoader:
    """5 batches of 16: 3 + 2 over two ranks (exercises the padding forwards)."""
    return DataLoader(span_inputs(80, seed=2), batch_size=16)


@contextlib.contextmanager
def no_estimate() -> Iterator[None]:
    """A resumed fit must take the bases from the checkpoint: estimating them raises (the calibration data is still
    read, on every rank, to verify them: the captured-energy check of issue 24)."""
    original = Protection.estimate

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("FORA re-estimated on resume instead of restoring its bases from the checkpoint")

    Protection.estimate = forbidden
    try:
        yield
    finally:
        Protection.estimate = original


def initial_net(fsdp2: bool = False, lazy: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(fsdp2=fsdp2, lazy=lazy)


def make_strategy(cfg: dict[str, Any]) -> Any:
    kind, world = cfg["strategy"], cfg["world"]
    cuda = cfg.get("accelerator", "cpu") == "cuda"
    backend = "nccl" if cuda else "gloo"
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=backend)
    if kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=world,
            tensor_parallel_size=1,
            save_distributed_checkpoint=cfg.get("state_dict_type", "sharded") == "sharded",
        )
    if kind == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel

        class CPUFSDPStrategy(FSDPStrategy):
            """FSDPStrategy on CPU (tests only): Lightning refuses CPU for ``FSDPStrategy`` itself, torch needs a device_id."""

            def _setup_model(self, model: nn.Module) -> nn.Module:
                return FullyShardedDataParallel(
                    module=model,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    **self.kwargs,
                )

            # Lightning's full state dict uses offload_to_cpu=True; on CPU that frees the live parameter
            # storage ("setStorage: ... out of bounds for storage of size 0"). Same contexts without offload:
            def _full_context(self) -> Any:
                from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

                return FullyShardedDataParallel.state_dict_type(
                    self.model,
                    StateDictType.FULL_STATE_DICT,
                    FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
                )

            def lightning_module_state_dict(self) -> dict[str, Any]:
                if self._state_dict_type != "full":
                    return super().lightning_module_state_dict()
                with self._full_context():
                    return self.model.state_dict()

            def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
                if self._state_dict_type != "full":
                    return super().optimizer_state(optimizer)
                from torch.distributed.fsdp import OptimStateKeyType

                optimizer = getattr(optimizer, "_optimizer", optimizer)
                with self._full_context():
                    state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
                    if self.global_rank == 0:
                        state = FullyShardedDataParallel.rekey_optim_state_dict(
                            state, OptimStateKeyType.PARAM_ID, self.model
                        )
                    return state

        return (FSDPStrategy if cuda else CPUFSDPStrategy)(
            auto_wrap_policy={nn.Linear},
            use_orig_params=cfg["use_orig_params"],
            state_dict_type=cfg.get("state_dict_type", "full"),
            process_group_backend=backend,
        )
    if kind == "single":
        return "auto"
    raise ValueError(f"unknown strategy {kind!r}")


def make_fora(calibration: Any, freeze_other: bool, **settings: Any) -> FORA:
    """The scenarios' FORA; ``settings`` (a scenario's ``fora`` / ``resume_fora``) override these."""
    return FORA(
        calibration=calibration,
        **{
            "target_modules": ["fc1", "fc2"],
            "rank": {"fc1": SPAN, "fc2": 8},
            "weight_rank": 2,
            "freeze_other": freeze_other,
            "progress": False,
            "precision": "float32",  # FSDP1 runs float32: compare like with like
            **settings,
        },
    )


def full_weights(trainer: pl.Trainer, fora: FORA, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full trained target weights (a collective under FSDP: every rank calls it)."""
    if cfg["strategy"] == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return {n: m.weight.detach().cpu().clone() for n, m in fora.protection.targets.items()}
    out = {}
    for n, m in fora.protection.targets.items():
        w = m.weight.detach()
        out[n] = (w.full_tensor() if hasattr(w, "full_tensor") else w).cpu().clone()
    return out


def fit(cfg: dict[str, Any], steps: int, calibration: Any, ckpt_path: str | None = None) -> tuple[pl.Trainer, FORA]:
    world = cfg["world"]
    settings = cfg.get("resume_fora", cfg.get("fora", {})) if ckpt_path else cfg.get("fora", {})
    fora = make_fora(calibration, cfg.get("freeze_other", True), **settings)
    trainer = pl.Trainer(
        accelerator=cfg.get("accelerator", "cpu"),
        devices=world if cfg["strategy"] != "single" else 1,
        strategy=make_strategy(cfg),
        precision=cfg.get("precision", "32-true"),
        max_steps=steps,
        callbacks=[fora],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(
        initial_net(fsdp2=cfg["strategy"] == "fsdp2", lazy=cfg.get("lazy", False)),
        task_loader(world),
        ckpt_path=ckpt_path,
    )
    return trainer, fora


def state_bytes(fora: FORA) -> list[int]:
    """Every rank's persistent FORA bytes (bases, U, S, V, spectra, anchors: each tensor once), by rank."""

    from fora_lightning.core.subspace import nbytes_summary

    return every_rank(nbytes_summary(fora.subspaces, spectrum=True))


def on_host(fora: FORA) -> bool:
    """Whether every layer's anchors ``W0 Q`` were held in host memory during the fit (``offload_anchors``)."""
    return all(s.anchors_on_host and s.anchor_q.device.type == "cpu" for s in fora.subspaces.values())


def sharded_functions(world: int) -> dict[str, Any]:
    """The sharded math called directly on the default gloo group (no Lightning): returns full results gathered.

    For each row count (5 and 7 over the ranks, uneven): ``project`` and ``project_weight_`` on this rank's rows
    with :class:`RowShard`; and :func:`spread_spectra` of shared covariances. Inputs are seeded, so every rank
    builds the same full tensors and keeps its rows.
    """
    import torch.distributed as dist

    from fora_lightning.core.covariance import Covariances
    from fora_lightning.core.distributed import RowShard, chunk_range, spread_spectra
    from fora_lightning.core.projection import project, project_weight_

    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for d_out in (5, 7):
        gen = torch.Generator().manual_seed(d_out)
        d_in, k, r = 12, 4, 2
        q, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen))
        u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen))
        g, w0, w = (torch.randn(d_out, d_in, generator=gen) for _ in range(3))
        lo, hi = chunk_range(d_out, rank, world)
        shard = RowShard(lo, hi, d_out, (dist.group.WORLD,))
        grad = shard.gather(project(shard.rows(g), q, shard.rows(u), v, all_reduce=shard.all_reduce))
        anchor_q, anchor_u = shard.rows(w0) @ q, shard.all_reduce(shard.rows(u).T @ shard.rows(w0))
        local_w = shard.rows(w).clone()
        project_weight_(local_w, q, anchor_q, shard.rows(u), v, anchor_u, all_reduce=shard.all_reduce)
        out[f"rows{d_out}"] = {
            "inputs": (g, w0, w, q, u, v),
            "grad": grad,
            "weight": shard.gather(local_w),
            "rows": (lo, hi),
        }
    gen = torch.Generator().manual_seed(3)
    cov = Covariances()
    for i, d in enumerate((6, 9, 4)):
        x = torch.randn(50, d, generator=gen, dtype=torch.float64)
        cov.sums[f"l{i}"], cov.counts[f"l{i}"], cov.owner[f"l{i}"] = x.T @ x, 50, f"l{i}"
    out["spectra"] = {"covariances": cov, "spectra": dict(spread_spectra(cov))}
    from fora_lightning.core.subspace import SubspaceConfig
    from fora_lightning.core.sufficiency import held_out_shares

    held = Covariances()
    for o, d in (("l0", 6), ("l1", 9), ("l2", 4)):
        x = torch.randn(12, d, generator=gen, dtype=torch.float64)
        held.sums[o], held.counts[o], held.owner[o] = x.T @ x, 12, o
    cov.held_out = held  # l1 (6 -> 9 rows): a layer reading l1's input too
    cov.owner["l1_b"] = "l1"
    names = ["l0", "l1", "l1_b", "l2"]
    out["sufficiency"] = {"covariances": cov, "names": names, "shares": held_out_shares(cov, names, SubspaceConfig())}
    return out


def counted_work(cfg: dict[str, Any]) -> list[dict[str, int]]:
    """Fit ``cfg["steps"]`` steps counting, per rank, the rows and flops FORA's layout projects (from the shapes
    it hands ``project`` / ``project_weight_``: ``4 rows d_in (k + r)`` each); every rank's counts, by rank."""

    from fora_lightning import layout

    work = {"grad_rows": 0, "weight_rows": 0, "flops": 0}

    def counting(fn: Any, kind: str) -> Any:
        def wrapped(x: torch.Tensor, basis: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            u = args[0] if args else kwargs.get("u")
            if kind == "weight":
                u = args[1] if len(args) > 1 else kwargs.get("u")
            work[f"{kind}_rows"] += x.shape[0]
            work["flops"] += 4 * x.shape[0] * x.shape[1] * (basis.shape[1] + (0 if u is None else u.shape[1]))
            return fn(x, basis, *args, **kwargs)

        return wrapped

    def counting_step(fn: Any) -> Any:  # project_step_(weight, before, basis, u, v, ...): the default post-step path
        def wrapped(w: torch.Tensor, before: torch.Tensor, basis: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            u = args[0] if args else kwargs.get("u")
            work["weight_rows"] += w.shape[0]
            work["flops"] += 4 * w.shape[0] * w.shape[1] * (basis.shape[1] + (0 if u is None else u.shape[1]))
            return fn(w, before, basis, *args, **kwargs)

        return wrapped

    saved = layout.project, layout.project_weight_, layout.project_step_
    layout.project, layout.project_weight_ = counting(saved[0], "grad"), counting(saved[1], "weight")
    layout.project_step_ = counting_step(saved[2])
    try:
        fit(cfg, cfg["steps"], calibration_loader())
    finally:
        layout.project, layout.project_weight_, layout.project_step_ = saved
    return every_rank(work)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (and/or resume); returns rank 0's results ``{phase: {"weights", "fora"}}``."""
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # GPU check: float32 matmuls, comparable with the CPU reference
    if cfg["strategy"] == "functions":
        return {"functions": sharded_functions(cfg["world"])}
    if cfg.get("count_work"):
        return {"work": counted_work(cfg)}
    results: dict[str, Any] = {}
    trainer = None
    if cfg.get("steps"):
        with no_estimate() if cfg.get("forbid_estimate") else contextlib.nullcontext():
            trainer, fora = fit(cfg, cfg["steps"], calibration_loader())
        results["train"] = {
            "weights": full_weights(trainer, fora, cfg),
            "fora": fora.state_dict(),
            "on_host": on_host(fora),
            "state_bytes": state_bytes(fora),
            "sentinel": fora.protection.monitor.summary() | {"source": fora.protection.monitor.probe_source},
        }
        results["train"]["no_grad_forwards"] = trainer.lightning_module.no_grad_forwards
        if cfg.get("save"):
            trainer.save_checkpoint(cfg["save"])
            results["checkpoint"] = cfg["save"]
    if cfg.get("resume_steps"):
        with no_estimate():
            trainer, fora = fit(cfg, cfg["resume_steps"], calibration_loader(), ckpt_path=cfg["resume_from"])
        results["resume"] = {
            "weights": full_weights(trainer, fora, cfg),
            "fora": fora.state_dict(),
            "on_host": on_host(fora),
            "state_bytes": state_bytes(fora),
            "sentinel": fora.protection.monitor.summary() | {"source": fora.protection.monitor.probe_source},
        }
    return results


def main() -> None:
    """Run every scenario of the config in these same processes (one process group; imports paid once).

    A scenario that raises is recorded (``{"error": traceback}``) and the next one runs.
    """
    cfg = json.loads(open(sys.argv[1]).read())
    out: dict[str, Any] = {}
    for scenario in cfg["scenarios"]:
        try:
            results = run({"world": cfg["world"], **scenario})
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results = {"error": traceback.format_exc()}
        out[scenario["name"]] = results
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out, cfg["out"])
    exit_cleanly()


if __name__ == "__main__":
    main()
