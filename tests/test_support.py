"""Refused at setup, by name: DeepSpeed strategies (FORA and FORA-LoRA) and quantized linears as full-FORA
targets. Small fake subclasses stand in for bitsandbytes/torchao/deepspeed, which are not installed here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.examples import Regressor as MLP
from fora_lightning import FORA, ForaLoRA
from fora_lightning.core.targets import quantization_of
from fora_lightning.support import is_deepspeed, refuse_quantized_targets, refuse_unsupported_strategy


class FakeDeepSpeed(DeepSpeedStrategy):
    def __init__(self, stage: int) -> None:  # DeepSpeedStrategy.__init__ needs deepspeed installed
        self.config = {"zero_optimization": {"stage": stage}}


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: a packed uint8 weight with a ``quant_state``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        packed = nn.Parameter(torch.zeros(d_in * d_out // 2, 1, dtype=torch.uint8), requires_grad=False)
        packed.quant_state = object()
        self.weight = packed


class Linear8bitLt(nn.Linear):
    """Class name as bitsandbytes' 8-bit linear, float weight."""


class QuantizedTensor(torch.Tensor):
    """Stands in for a torchao tensor subclass (float dtype reported, quantized storage)."""


class TorchaoLinear(nn.Linear):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.weight = nn.Parameter(torch.randn(d_out, d_in).as_subclass(QuantizedTensor))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_is_refused_by_name_at_setup(stage):
    trainer = SimpleNamespace(strategy=FakeDeepSpeed(stage))
    assert is_deepspeed(trainer.strategy) and not is_deepspeed(DDPStrategy())
    for cb, who in (
        (FORA(calibration=[torch.randn(2, 8)]), "FORA"),
        (ForaLoRA(calibration=[torch.randn(2, 8)], lora_rank=2), "FORA-LoRA"),
    ):
        with pytest.raises(
            RuntimeError, match=rf"{who} does not support FakeDeepSpeed \(ZeRO stage {stage}\).*strategy='ddp'"
        ):
            cb.setup(trainer, MLP(), "fit")


def test_deepspeed_named_class_without_lightning_base_is_refused():
    class DeepSpeedStrategy:  # e.g. a fork's own class
        pass

    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy"):
        refuse_unsupported_strategy(SimpleNamespace(strategy=DeepSpeedStrategy()), "FORA")
    refuse_unsupported_strategy(SimpleNamespace(strategy=DDPStrategy()), "FORA")  # no error


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (Linear4bit(8, 4), "Linear4bit"),
        (Linear8bitLt(8, 4), "Linear8bitLt"),
        (TorchaoLinear(8, 4), "QuantizedTensor tensor subclass"),
    ],
)
def test_quantized_layers_are_detected_and_refused(layer, why):
    assert why in quantization_of(layer)
    with pytest.raises(
        TypeError, match=rf"FORA \(full fine-tuning\) cannot protect quantized layers: 'fc1' is .*{why}"
    ):
        refuse_quantized_targets({"fc1": layer, "fc2": nn.Linear(4, 4)}, "FORA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_float_layers_are_not_quantized(dtype):
    assert quantization_of(nn.Linear(8, 4).to(dtype)) is None


def test_fora_fit_refuses_a_quantized_target_before_training():
    model = MLP()
    model.fc1 = Linear4bit(model.fc1.in_features, model.fc1.out_features)
    cb = FORA(calibration=[torch.randn(4, model.fc1.in_features)], progress=False, target_modules=["fc1", "fc2"])
    data = DataLoader(TensorDataset(torch.randn(8, model.fc1.in_features), torch.randn(8, 8)), batch_size=4)
    with pytest.raises(TypeError, match="'fc1' is a Linear4bit"):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(model, data)


@pytest.mark.parametrize(
    ("layer", "why"),
    [(TorchaoLinear(8, 4), "QuantizedTensor tensor subclass"), (Linear8bitLt(8, 4), "a Linear8bitLt")],
)
def test_fora_lora_over_a_base_it_cannot_dequantize_is_refused(layer, why):
    """QLoRA over bitsandbytes bases works (tests/test_qlora.py); other formats, or a not yet quantized one, are refused."""
    from fora_lightning.lora import inject_fora_lora

    model = MLP()
    model.fc1 = layer
    with pytest.raises(TypeError, match=rf"FORA-LoRA cannot read the base weight W0 of 'fc1': it is .*{why}"):
        inject_fora_lora(model, ["fc1", "fc2"], lora_rank=2)
    assert type(model.fc2) is nn.Linear  # nothing was wrapped
