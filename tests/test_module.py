"""ForaModule around a plain user LightningModule (as a Python object): delegation, protection, checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from fora_lightning import FORA, ForaLoRA, ForaModule, merge_lora
from fora_lightning.lora import ForaLoraLinear


class UserMLP(MLP):
    """A user module with validation logging and its own calibration data (no FORA code in it)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", torch.nn.functional.mse_loss(self(x), y))

    def calibration_dataloader(self):
        return calibration_loader()


def outside_channel_leak(delta: torch.Tensor, w0: torch.Tensor, x: torch.Tensor, sub) -> float:
    """``||(D - U diag(U^T D V) V^T) X^T|| / ||W0 X^T||``: what the update does to held-out kept inputs, channel removed."""
    channel = sub.u @ torch.diag(torch.diagonal(sub.u.T @ delta @ sub.v)) @ sub.v.T
    return ((delta - channel) @ x.T).norm().item() / (w0 @ x.T).norm().item()


def fit_wrapped(tmp_path, **fora) -> tuple[ForaModule, pl.Trainer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    wrapped = ForaModule(UserMLP(lr=5e-2), target_modules=["fc1", "fc2"], weight_rank=2, progress=False, **fora)
    w0 = {n: p.detach().clone() for n, p in wrapped.module.state_dict().items()}
    trainer = tiny_trainer(
        max_steps=40,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")],
        limit_val_batches=2,
        val_check_interval=8,
    )
    trainer.fit(wrapped, train_dataloaders=task_loader(), val_dataloaders=task_loader(n=64))
    return wrapped, trainer, w0


def test_delegates_exactly_the_overridden_hooks():
    wrapped = ForaModule(UserMLP())
    for name in ("training_step", "validation_step", "configure_optimizers"):
        assert is_overridden(name, wrapped, pl.LightningModule)
    for name in ("training_step", "validation_step", "configure_optimizers", "calibration_dataloader"):
        assert getattr(wrapped, name).__wrapped__ == getattr(wrapped.module, name)
    for name in ("test_step", "predict_step", "train_dataloader", "configure_model", "on_fit_end"):
        assert not is_overridden(name, wrapped, pl.LightningModule)
    assert not hasattr(ForaModule(MLP()), "calibration_dataloader")
    assert isinstance(wrapped.configure_callbacks()[-1], FORA)
    assert set(wrapped.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_fit_protects_and_logs_through_the_wrapped_module(tmp_path):
    wrapped, trainer, w0 = fit_wrapped(tmp_path)
    assert trainer.global_step == 40
    assert "val_mse" in trainer.callback_metrics  # the wrapped module's self.log reached the trainer
    fora = next(c for c in trainer.callbacks if isinstance(c, FORA))
    held_out = span_inputs(64, seed=7)
    fc1 = wrapped.module.fc1.weight.detach()
    delta = fc1 - w0["fc1.weight"]
    assert delta.norm() / w0["fc1.weight"].norm() > 0.05  # it really trained
    assert outside_channel_leak(delta, w0["fc1.weight"], held_out, fora.subspaces["module.fc1"]) < 1e-5


def test_checkpoint_loads_into_bare_class_and_wrapper(tmp_path):
    wrapped, _, _ = fit_wrapped(tmp_path, energy=0.95)
    path = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert raw["hyper_parameters"] == {"lr": 5e-2, "weight_decay": 0.1}
    bare = UserMLP.load_from_checkpoint(path)
    assert bare.hparams.lr == 5e-2
    for k, v in wrapped.module.state_dict().items():
        torch.testing.assert_close(bare.state_dict()[k], v)
    again = ForaModule.load_from_checkpoint(path, weight_rank=3)
    assert isinstance(again.module, UserMLP) and again.module.hparams.lr == 5e-2
    assert again.config.energy == 0.95 and again.config.weight_rank == 3
    torch.testing.assert_close(again.module.fc1.weight, wrapped.module.fc1.weight)


def test_lora_checkpoint_reloads_into_the_wrapper_and_merges_into_the_bare_class(tmp_path):
    wrapped, _, w0 = fit_wrapped(tmp_path, lora_rank=4, lora_alpha=8.0)
    path = tmp_path / "ckpt" / "last.ckpt"
    x = span_inputs(16, seed=9) + torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    wrapped.eval()
    with torch.no_grad():
        tuned = wrapped(x)
    again = ForaModule.load_from_checkpoint(path).eval()
    assert (again.config.lora_rank, again.config.lora_alpha, again.config.lora_dropout) == (4, 8.0, 0.0)
    assert isinstance(again.module.fc1, ForaLoraLinear) and again.module.fc1.ready
    assert again.module.fc1.k == wrapped.module.fc1.k > 0  # the basis buffer took the checkpoint's k
    with torch.no_grad():
        torch.testing.assert_close(again(x), tuned, atol=0, rtol=0)
    with pytest.raises(ValueError, match="saved layer settings"):
        ForaModule.load_from_checkpoint(path, lora_rank=8)
    # the bare class cannot hold the LoRA layers; the merged wrapped module is that class with plain weights
    with pytest.raises(RuntimeError, match="base_layer"):
        UserMLP.load_from_checkpoint(path)
    merged = merge_lora(again.module)
    assert type(merged) is UserMLP and set(merged.state_dict()) == set(w0)
    bare, base = UserMLP().eval(), UserMLP().eval()
    bare.load_state_dict(merged.state_dict())
    base.load_state_dict(w0)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), tuned, atol=1e-5, rtol=0)
        assert (tuned - base(x)).abs().max() > 1e-2  # the LoRA update really trained


def test_load_from_checkpoint_refuses_a_bare_checkpoint(tmp_path):
    trainer = tiny_trainer(
        max_steps=1,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="bare")],
    )
    trainer.fit(MLP(), train_dataloaders=task_loader(n=32))
    with pytest.raises(ValueError, match="no 'fora_module' entry"):
        ForaModule.load_from_checkpoint(tmp_path / "bare.ckpt")


def test_lora_rank_selects_fora_lora():
    cb = ForaModule(MLP(), target_modules=["fc1"], lora_rank=4, lora_alpha=8.0).configure_callbacks()[-1]
    assert isinstance(cb, ForaLoRA) and (cb.config.lora_rank, cb.config.lora_alpha) == (4, 8.0)


def test_every_fora_setting_reaches_the_callback(tmp_path):
    wrapped = ForaModule(
        MLP(),
        target_modules=["fc1"],
        energy=0.9,
        weight_rank=3,
        mode="gradient",
        combine="union",
        capability_weights={"a": 2.0, "b": 1.0},
        extend_to=str(tmp_path / "ab.safetensors"),
    )
    cb = wrapped.configure_callbacks()[-1]
    assert (
        isinstance(cb, FORA) and cb.config.combine == "union" and cb.config.capability_weights == {"a": 2.0, "b": 1.0}
    )
    assert (cb.config.energy, cb.config.weight_rank, cb.config.mode, cb.config.extend_to) == (
        0.9,
        3,
        "gradient",
        str(tmp_path / "ab.safetensors"),
    )


def test_rejects_a_plain_module():
    with pytest.raises(TypeError, match="needs a LightningModule, got Linear"):
        ForaModule(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
