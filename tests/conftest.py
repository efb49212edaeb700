"""Shared fixtures: a small MLP LightningModule whose calibration inputs live in a known subspace."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

D_IN, D_HID, D_OUT, SPAN = 16, 24, 8, 5


class MLP(pl.LightningModule):
    """fc1 -> tanh -> fc2, MSE loss on (x, y); AdamW with weight decay."""

    def __init__(self, lr: float = 3e-2, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.fc2 = nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def span_basis(seed: int = 0) -> torch.Tensor:
    """An orthonormal D_IN x SPAN frame: the 'capability' inputs live in its span."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D_IN, SPAN, generator=gen))
    return q


def span_inputs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, SPAN, generator=gen) @ span_basis().T


def task_loader(n: int = 256, seed: int = 1, batch_size: int = 32) -> DataLoader:
    """The new task: full-rank inputs, random targets (forces big weight changes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen)
    y = 3 * torch.randn(n, D_OUT, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def calibration_loader(n: int = 128, batch_size: int = 32) -> DataLoader:
    """Label-free calibration batches: tensors in span(Q), passed as ``module(x)``."""
    return DataLoader(span_inputs(n, seed=2), batch_size=batch_size)


def tiny_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()
