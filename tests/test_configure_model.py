"""Modules that build their layers in ``configure_model`` (Lightning's advice for large and sharded models).

``Callback.setup`` runs before ``configure_model``: the Callbacks find and freeze the targets right after
it instead, before the strategy wraps the model and before ``configure_optimizers``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from torch import nn

from fora_lightning import FORA, ForaLoRA
from fora_lightning.baselines import TrainTargetsOnly
from fora_lightning.lora.layer import ForaLoraLinear
from fora_lightning.metrics import leakage


class LazyMLP(MLP):
    """The conftest MLP, but its layers appear only in ``configure_model`` (idempotent, as Lightning asks)."""

    def __init__(self) -> None:
        super().__init__()
        self.built = (copy.deepcopy(self.fc1), copy.deepcopy(self.fc2))
        del self.fc1, self.fc2

    def configure_model(self) -> None:
        if not hasattr(self, "fc1"):
            self.fc1, self.fc2 = self.built

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)


def _fit(model: LazyMLP, callback, steps: int = 60) -> LazyMLP:
    tiny_trainer(max_steps=steps, callbacks=[callback]).fit(model, task_loader())
    return model


def test_fora_finds_and_freezes_layers_built_in_configure_model() -> None:
    model = LazyMLP()
    base = copy.deepcopy(model.built[0])
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], weight_rank=0, energy=0.999, progress=False)
    _fit(model, cb)
    assert list(cb.subspaces) == ["fc1"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc1.weight"]
    assert "configure_model" not in model.__dict__  # the module's own hook is back
    moved = float((model.fc1.weight.detach() - base.weight).norm() / base.weight.norm())
    leak = leakage(model.fc1.weight - base.weight, base.weight, span_inputs(300, seed=9))
    assert moved > 0.1 and leak < 1e-5


def test_lora_and_plain_baseline_also_wait_for_configure_model() -> None:
    lora = _fit(
        LazyMLP(),
        ForaLoRA(calibration=calibration_loader(), target_modules=["fc1"], lora_rank=2, progress=False),
        steps=5,
    )
    assert isinstance(lora.fc1, ForaLoraLinear)
    plain = _fit(LazyMLP(), TrainTargetsOnly(target_modules=["fc2"]), steps=5)
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == ["fc2.weight"]


def test_targets_missing_after_configure_model_still_name_the_layers() -> None:
    model = LazyMLP()
    cb = FORA(calibration=calibration_loader(), target_modules=["fc3"], progress=False)
    with pytest.raises(ValueError, match=r"matched no module of LazyMLP.*fc1, fc2"):
        _fit(model, cb, steps=1)
    assert "configure_model" not in model.__dict__


def test_a_module_without_configure_model_fails_in_setup() -> None:
    model = MLP()
    with pytest.raises(ValueError, match="matched no module"):
        _fit(model, FORA(calibration=calibration_loader(), target_modules=["fc3"], progress=False), steps=1)
    assert isinstance(model.fc1, nn.Linear)
