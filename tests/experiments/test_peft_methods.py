"""The PEFT peers' glue: OSF's per-layer effective rank through peft itself, CorDA's unpadded calibration rows."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from experiments.peft_methods import PeftOSF, unpadded_rows


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 8, bias=False)
        self.b = nn.Linear(8, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _Outer(nn.Module):  # stands for the LightningModule: FORA's k is keyed by its names ("model.a")
    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()


def test_osf_freezes_foras_k_per_layer_and_trains_the_rest():
    torch.manual_seed(0)
    outer = _Outer()
    osf = PeftOSF(target_modules=["a", "b"], effective_rank="fora", fora_ks={"model.a": 3, "model.b": 0})
    config = osf.peft_config(None, outer, outer.model, ["a", "b"])
    peft_model = get_peft_model(outer.model, config)
    assert osf.ks == {"model.a": 3, "model.b": 1}  # OSF refuses 0: clipped to 1
    ranks = {
        name: m.effective_rank["default"] for name, m in outer.model.named_modules() if hasattr(m, "effective_rank")
    }
    assert ranks == {"a": 3, "b": 1}
    trainable = sum(p.numel() for p in outer.parameters() if p.requires_grad)
    # per layer (out x in, m = min): U_low out x (m - k), S_low (m - k), V_low (m - k) x in
    assert trainable == (8 * 5 + 5 + 5 * 12) + (16 * 7 + 7 + 7 * 8)
    x = torch.randn(5, 12)
    before = outer.model(x).detach()
    assert torch.allclose(peft_model(x), before, atol=1e-5)  # identity at init
    with torch.no_grad():
        peft_model.base_model.model.a.osf_svd_params["default"]["S_low"].mul_(2.0)  # a trained adapter
    tuned = peft_model(x).detach()
    osf.peft_model = peft_model
    merged = osf.merge()
    assert isinstance(merged.a, nn.Linear) and merged is outer.model  # merged in place, plain layers again
    assert torch.allclose(outer.model(x), tuned, atol=1e-5) and not torch.allclose(tuned, before, atol=1e-3)


def test_osf_needs_foras_k_or_a_number():
    with pytest.raises(ValueError, match="run 'fora' first"):
        PeftOSF(target_modules=["a"], effective_rank="fora")
    outer = _Outer()
    osf = PeftOSF(target_modules=["a"], effective_rank="fora", fora_ks={"model.b": 2})
    with pytest.raises(ValueError, match="no k for layer 'model.a'"):
        osf.peft_config(None, outer, outer.model, ["a"])


def test_unpadded_rows_strip_padding_and_walk_every_loader():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    rows = [r.tolist() for r in unpadded_rows({"x": [batch], "y": [{"input_ids": torch.tensor([[1, 2]])}]})]
    assert rows == [[[5, 6, 7]], [[8]], [[1, 2]]]
