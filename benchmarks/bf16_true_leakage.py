"""Leakage that bf16 rounding leaves under ``precision="bf16-true"`` after N AdamW steps (FORA.md, precision notes).

FORA projects in float32 and casts back to bf16; the rounding of ``W`` after each step moves it off the
feasible set by ~2^-8 relative per element. This trains an MLP (d_in 256 -> 512 -> 256, calibration inputs
in a 32-dim span) with the FORA Callback at ``bf16-true`` and at ``32-true`` and reports, per layer,

    leakage = ||P_U (W - W0) X|| / ||W0 X||   on held-out inputs X in span(Q)   (P_U: outside the spectral channel)

and the update size ``||W - W0|| / ||W0||``. Writes JSON (default results/bf16_true_leakage/results.json).

    python benchmarks/bf16_true_leakage.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fora_lightning import FORA

D_IN, D_HID, D_OUT, SPAN = 256, 512, 256, 32


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.fc1, self.fc2 = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)


def data(steps: int, batch: int = 64) -> tuple[DataLoader, DataLoader, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    span, _ = torch.linalg.qr(torch.randn(D_IN, SPAN, generator=gen))
    calib = torch.randn(512, SPAN, generator=gen) @ span.T
    x = torch.randn(steps * batch, D_IN, generator=gen)
    y = torch.randn(steps * batch, D_OUT, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch), DataLoader(calib, batch_size=64), span


def run(precision: str, steps: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = MLP()
    w0 = {n: getattr(model, n).weight.detach().double().clone() for n in ("fc1", "fc2")}
    task, calib, _ = data(steps)
    fora = FORA(calibration=calib, target_modules=["fc1", "fc2"], energy=0.999, weight_rank=8, progress=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[fora],
    )
    trainer.fit(model, task)
    out = {}
    for n, base in w0.items():
        sub = fora.subspaces[n]
        d = getattr(model, n).weight.detach().double() - base
        u = sub.u.double()
        pd = d - u @ (u.T @ d)
        x = (
            torch.randn(256, sub.k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            @ sub.basis.double().T
        )
        out[n] = {
            "k": sub.k,
            "leakage": float((x @ pd.T).norm() / (x @ base.T).norm()),
            "update": float(d.norm() / base.norm()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("results/bf16_true_leakage/results.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    result = {
        "command": f"python benchmarks/bf16_true_leakage.py --steps {args.steps}",
        "model": f"MLP {D_IN}->{D_HID}->{D_OUT}, calibration span {SPAN}, AdamW lr 1e-3 wd 0.01, batch 64",
        "steps": args.steps,
        "bf16-true": run("bf16-true", args.steps),
        "32-true": run("32-true", args.steps),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "machine": platform.machine(),
    }
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
