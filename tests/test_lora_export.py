"""Issue 24 item 5: export_lora_adapter writes every trained parameter (PEFT's modules_to_save) or refuses by name,
and leaves no stale adapter beside its own files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from safetensors.torch import load_file
from torch import nn

from fora_lightning import ForaLoRA, export_lora_adapter


def _trained(freeze_other: bool) -> tuple[MLP, MLP]:
    torch.manual_seed(0)
    base = MLP()
    model = copy.deepcopy(base)
    cb = ForaLoRA(
        calibration=calibration_loader(), target_modules=["fc1"], freeze_other=freeze_other, progress=False, lora_rank=4
    )
    tiny_trainer(max_steps=30, callbacks=[cb]).fit(model, task_loader())
    return base.eval(), model.eval()


def _peft_outputs(base: MLP, directory, x: torch.Tensor) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()(x)


def test_other_trained_parameters_are_exported_as_modules_to_save(tmp_path):
    base, model = _trained(freeze_other=False)
    assert not torch.equal(model.fc2.weight, base.fc2.weight)  # fc2 trained (unprotected)
    export_lora_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert config["modules_to_save"] == ["fc2"]
    assert {"base_model.model.fc2.weight", "base_model.model.fc2.bias"} <= set(tensors)
    x = torch.cat([span_inputs(64, seed=9), torch.randn(64, model.fc1.base_layer.in_features)])
    with torch.no_grad():
        tuned = model(x)
    off = float((_peft_outputs(base, tmp_path, x) - tuned).abs().max() / tuned.abs().max())
    print(f"freeze_other=False, exported adapter loaded with PEFT: max relative output error {off:.2e} (issue: 0.73)")
    assert off < 1e-5


def test_a_frozen_run_exports_no_modules_to_save(tmp_path):
    base, model = _trained(freeze_other=True)
    export_lora_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None
    x = torch.randn(32, model.fc1.base_layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(_peft_outputs(base, tmp_path, x), model(x), atol=1e-5, rtol=0)


def test_a_trained_parameter_peft_cannot_carry_is_refused_by_name(tmp_path):
    _, model = _trained(freeze_other=True)
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))  # on the root, around the FORA-LoRA layers
    with pytest.raises(ValueError, match=r"trained parameters \['scale'\] cannot go in a PEFT adapter"):
        export_lora_adapter(model, tmp_path)
    model.scale.requires_grad_(False)
    model.fc1.base_layer.bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['fc1.base_layer.bias'\]"):
        export_lora_adapter(model, tmp_path)


def test_no_stale_adapter_is_left_beside_the_export(tmp_path):
    _, model = _trained(freeze_other=True)
    (tmp_path / "adapter_model.bin").write_bytes(b"an older adapter")
    with pytest.raises(ValueError, match=r"already holds \['adapter_model.bin'\]"):
        export_lora_adapter(model, tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    export_lora_adapter(model, tmp_path)
    export_lora_adapter(model, tmp_path)  # over its own files: replaced, nothing else written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
