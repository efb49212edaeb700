"""A small user LightningModule and data for ``configs/wrap_existing.yaml``: nothing FORA-specific in them."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override


class Regressor(LightningModule):
    """An ordinary user module: ``fc2(tanh(fc1(x)))``, MSE loss, AdamW reading ``self.hparams``."""

    def __init__(
        self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8, lr: float = 3e-2, weight_decay: float = 0.1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class KeepAndLearnData(LightningDataModule):
    """A new task (full-rank inputs, random targets) and a capability to keep (inputs in a ``keep_rank``-dim subspace).

    ``calibration_dataloader`` yields label-free inputs of the kept capability (the FORA Callback reads it);
    ``keep_x`` holds them for measuring how much the tuned model's response to them moved.
    """

    def __init__(
        self,
        d_in: int = 16,
        d_out: int = 8,
        keep_rank: int = 4,
        n_task: int = 256,
        n_keep: int = 128,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.keep_basis, _ = torch.linalg.qr(torch.randn(d_in, keep_rank, generator=gen))
        self.task_x = torch.randn(n_task, d_in, generator=gen)
        self.task_y = 3 * torch.randn(n_task, d_out, generator=gen)
        self.keep_x = torch.randn(n_keep, keep_rank, generator=gen) @ self.keep_basis.T
        self.batch_size = batch_size

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.task_x, self.task_y), batch_size=self.batch_size, shuffle=True)

    def calibration_dataloader(self) -> DataLoader:
        """Inputs only (``x``), which FORA passes as ``module(x)``."""
        return DataLoader(self.keep_x, batch_size=self.batch_size)
