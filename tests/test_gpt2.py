"""GPT-2-family models: transformers' ``Conv1D`` (weight stored ``d_in x d_out``, ``y = x W + b``) as a FORA,
FORA-LoRA, merge, PEFT-export and subspace-file target, with the GPT-2 names chosen when the default
(Llama) target list matches nothing."""

from __future__ import annotations

import copy
import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_trainer
from test_callback_llm import _batches, _layer_inputs
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from fora_lightning import FORA, ForaLoRA, merge_lora
from fora_lightning.core.projection import project, project_weight_, right_project
from fora_lightning.core.subspace_file import load_subspaces
from fora_lightning.core.targets import DEFAULT_TARGETS, find_targets, is_transposed, quantization_of, weight_matrix
from fora_lightning.lora import export_lora_adapter, fora_lora_layers
from fora_lightning.metrics import leakage

VOCAB = 100
GPT2_LAYERS = {
    f"model.transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class TinyGPT2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _data() -> tuple[list, DataLoader]:
    calibration = _batches(6, seed=1, low=0, high=VOCAB // 2, pad=True)
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]
    return calibration, DataLoader(train, batch_size=None)


def test_conv1d_is_read_as_its_transpose():
    conv = Conv1D(nf=5, nx=3)  # y = x W + b with W: 3 x 5
    assert is_transposed(conv) and not is_transposed(torch.nn.Linear(3, 5))
    assert weight_matrix(conv).shape == (5, 3)
    x = torch.randn(4, 3)
    torch.testing.assert_close(conv(x), x @ weight_matrix(conv).T + conv.bias)
    with torch.no_grad():
        weight_matrix(conv).zero_()  # a view: writes reach the parameter
    assert not conv.weight.any()
    assert quantization_of(conv) is None


def test_projections_act_on_the_transposed_layout():
    """``project``/``project_weight_`` through the ``W^T`` view of a Conv1D equal the dense float64 reference."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out, k, r = 12, 7, 4, 2
    q = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=torch.float64))[0]
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w0)
    u, v = u[:, :r], vh[:r].T
    g = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    p_q, p_u = torch.eye(d_in, dtype=torch.float64) - q @ q.T, torch.eye(d_out, dtype=torch.float64) - u @ u.T
    ref = p_u @ g @ p_q + u @ torch.diag(torch.diag(u.T @ g @ v)) @ v.T
    stored = g.T.clone()  # Conv1D layout
    view = stored.T
    view.copy_(project(view, q, u, v))
    torch.testing.assert_close(stored.T, ref)
    w_stored = (w0 + g).T.clone()
    project_weight_(w_stored.T, q, w0 @ q, u, v, u.T @ w0)
    torch.testing.assert_close(w_stored.T, w0 + ref)


def test_default_targets_fall_back_to_the_gpt2_names():
    model = TinyGPT2()
    targets = find_targets(model, list(DEFAULT_TARGETS))
    assert set(targets) == GPT2_LAYERS and all(isinstance(m, Conv1D) for m in targets.values())
    assert set(find_targets(model, ["c_fc"])) == {f"model.transformer.h.{i}.mlp.c_fc" for i in range(2)}
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, ["q_proj"])  # an explicit list is taken as given


def test_fora_full_fine_tuning_keeps_gpt2_leakage_below_1e5(tmp_path, caplog):
    base, model = TinyGPT2(), TinyGPT2()
    calibration, train = _data()
    path = tmp_path / "gpt2.subspaces.safetensors"
    cb = FORA(calibration=calibration, energy=0.99, weight_rank=4, progress=False, subspaces=str(path))
    with caplog.at_level(logging.INFO):
        tiny_trainer(max_steps=12, callbacks=[cb]).fit(model, train)
    assert "GPT-2-family model" in caplog.text
    assert set(cb.protection.targets) == GPT2_LAYERS
    held_out = _layer_inputs(base, _batches(3, seed=7, low=0, high=VOCAB // 2), list(cb.protection.targets))
    base_mods = dict(base.named_modules())
    leaks, moved = [], []
    for name, module in cb.protection.targets.items():
        sub = cb.subspaces[name]
        assert (sub.d_out, sub.d_in) == tuple(module.weight.T.shape) and 0 < sub.k < sub.d_in
        x = held_out[name].double()
        x_span = x - right_project(x, sub.basis.double(), sub.complement)
        w0 = base_mods[name].weight.detach().T.double()  # d_out x d_in
        d = module.weight.detach().T.double() - w0
        u, v = sub.u.double(), sub.v.double()
        channel = u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
        leaks.append(leakage(d - channel, w0, x_span))
        moved.append(float(d.norm() / w0.norm()))
    assert max(leaks) <= 1e-5
    assert min(moved) > 1e-3  # every layer did train
    loaded, _ = load_subspaces(path)  # the subspace file round trip
    assert set(loaded) == GPT2_LAYERS
    for name, sub in loaded.items():
        assert (sub.d_out, sub.d_in) == (cb.subspaces[name].d_out, cb.subspaces[name].d_in)
        torch.testing.assert_close(sub.basis, cb.subspaces[name].basis.cpu())
    again = FORA(calibration=calibration, energy=0.99, weight_rank=4, progress=False, subspaces=str(path))
    tiny_trainer(max_steps=1, callbacks=[again]).fit(TinyGPT2(), train)  # loads the file, validates the shapes
    for name, sub in again.subspaces.items():
        torch.testing.assert_close(sub.basis, loaded[name].basis)


@pytest.fixture(scope="module")
def lora_gpt2():
    module = TinyGPT2()
    base = copy.deepcopy(module.model)
    calibration, train = _data()
    cb = ForaLoRA(calibration=calibration, weight_rank=4, lora_rank=4, lora_alpha=8, progress=False)
    tiny_trainer(max_steps=12, callbacks=[cb]).fit(module, train)
    module.eval()
    probe = _batches(2, seed=5, low=0, high=VOCAB)[0]["input_ids"]
    with torch.no_grad():
        tuned, base_logits = module.model(input_ids=probe).logits, base(input_ids=probe).logits
    assert float((tuned - base_logits).abs().max()) > 1e-3
    return module, base, probe, tuned


def test_fora_lora_wraps_conv1d_and_merges(lora_gpt2):
    module, _, probe, tuned = lora_gpt2
    layers = fora_lora_layers(module.model)
    assert {f"model.{n}" for n in layers} == GPT2_LAYERS and all(
        isinstance(lay.base_layer, Conv1D) for lay in layers.values()
    )
    layer = layers["transformer.h.0.mlp.c_fc"]
    assert (layer.out_features, layer.in_features) == (256, 64) and layer.weight.shape == (256, 64)
    merged = merge_lora(copy.deepcopy(module.model))
    assert not fora_lora_layers(merged) and type(merged.transformer.h[0].mlp.c_fc) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, tuned, atol=1e-5, rtol=0)


def test_fora_lora_export_loads_with_peft_on_gpt2(lora_gpt2, tmp_path):
    peft = pytest.importorskip("peft")
    module, base, probe, tuned = lora_gpt2
    export_lora_adapter(module, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=probe).logits, tuned, atol=1e-5, rtol=0)
        merged = peft_model.merge_and_unload()  # PEFT's own merge goes through fan_in_fan_out
        torch.testing.assert_close(merged(input_ids=probe).logits, tuned, atol=1e-5, rtol=0)
