"""FORA-LoRA: layer math against a dense float64 reference, Lightning fit (base-equal start, confinement,
parameter count, resume), merge / PEFT-layout export on a tiny transformers causal LM."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from conftest import D_HID, D_IN, D_OUT, MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fora_lightning import ForaLoRA, export_lora_adapter, merge_lora
from fora_lightning.core.subspace import LayerSubspace, complement_basis
from fora_lightning.lora import ForaLoraLinear, fora_lora_layers, inject_fora_lora, trainable_parameters


# ---------------------------------------------------------------------------- layer math
def _subspace(w0: torch.Tensor, q: torch.Tensor, r: int, complement: bool) -> LayerSubspace:
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    return LayerSubspace(
        d_out=w0.shape[0],
        d_in=w0.shape[1],
        k=q.shape[1],
        basis=complement_basis(q) if complement else q,
        complement=complement,
        u=u[:, :r],
        s=s[:r],
        v=vh[:r].T,
    )


def _dense_update(layer: ForaLoraLinear, q: torch.Tensor) -> torch.Tensor:
    """``(alpha/r) P_U B A P_Q + U diag(delta) V^T`` with explicit d x d projectors, float64."""
    u, v = layer.fora_u.double(), layer.fora_v.double()
    p_q = torch.eye(q.shape[0], dtype=torch.float64) - q @ q.T
    p_u = torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T
    lora = (layer.lora_alpha / layer.lora_rank) * p_u @ layer.lora_B.double() @ layer.lora_A.double() @ p_q
    return lora + u @ torch.diag(layer.lora_delta.double()) @ v.T


def _random_layer(d_out, d_in, k, r, r_lora, complement, seed):
    gen = torch.Generator().manual_seed(seed)
    k, r = min(k, d_in), min(r, d_out, d_in)
    base = nn.Linear(d_in, d_out).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64))
        base.bias.copy_(torch.randn(d_out, generator=gen, dtype=torch.float64))
    q = torch.linalg.qr(torch.randn(d_in, max(k, 1), generator=gen, dtype=torch.float64))[0][:, :k]
    layer = ForaLoraLinear(base, r_lora, lora_alpha=2.0 * r_lora + 1, weight_rank=r, name="probe")
    layer.set_subspace(_subspace(base.weight.detach(), q, r, complement))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d_out, r_lora, generator=gen, dtype=torch.float64))
        layer.lora_delta.copy_(torch.randn(layer.weight_rank, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 5, d_in, generator=gen, dtype=torch.float64)
    return layer, q, x


layer_cases = st.tuples(
    st.integers(1, 12),  # d_out
    st.integers(1, 12),  # d_in
    st.integers(0, 12),  # k (clamped to d_in)
    st.integers(0, 5),  # r (clamped)
    st.integers(1, 4),  # r_lora
    st.booleans(),  # complement basis
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=40, deadline=None)
@given(layer_cases)
def test_layer_forward_merge_and_factors_match_dense_reference(case):
    layer, q, x = _random_layer(*case)
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    dense = _dense_update(layer, q)
    expected = x @ (w0 + dense).T + b0
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)
    b_prime, a_prime = layer.factors()
    assert a_prime.shape == (layer.lora_rank + layer.weight_rank, w0.shape[1])
    torch.testing.assert_close(b_prime @ a_prime, dense, atol=1e-10, rtol=1e-10)
    # inputs in span(Q) change only through the spectral channel
    xs = x @ q @ q.T
    channel = (xs @ layer.fora_v.double()) * layer.lora_delta @ layer.fora_u.double().T
    torch.testing.assert_close(layer(xs) - layer.base_layer(xs), channel, atol=1e-10, rtol=1e-10)
    merged = merge_lora(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, w0 + dense, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(merged(x), expected, atol=1e-10, rtol=1e-10)


def test_unready_layer_is_the_base_layer_but_refuses_to_train():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = ForaLoraLinear(base, lora_rank=2, lora_alpha=4, weight_rank=2, name="blocks.0.fc")
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), base(x))
    with pytest.raises(RuntimeError, match=r"'blocks.0.fc'.*training forward before its bases"):
        layer.train()(x)
    with torch.no_grad():
        layer.lora_B.fill_(0.5)
        with pytest.raises(RuntimeError, match=r"'blocks.0.fc' has a nonzero update"):
            layer.eval()(x)
        with pytest.raises(RuntimeError, match="cannot merge"):
            merge_lora(layer)


def test_state_dict_with_calibrated_bases_loads_into_a_fresh_layer():
    layer, q, x = _random_layer(5, 7, 3, 2, 2, False, seed=3)
    fresh = ForaLoraLinear(nn.Linear(7, 5).double(), lora_rank=2, lora_alpha=layer.lora_alpha, weight_rank=2)
    assert fresh.fora_basis.shape == (7, 0) and not fresh.ready
    fresh.load_state_dict(layer.state_dict())
    assert fresh.ready and fresh.k == 3
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------- Lightning fit (MLP)
class OutputsAtTrainStart(pl.Callback):
    """Records the model's outputs on fixed inputs when training starts (after ForaLoRA calibrated)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.outputs, self.ready = x, None, None

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            self.outputs = pl_module(self.x).clone()
        self.ready = [layer.ready for layer in fora_lora_layers(pl_module).values()]


def _fora_lora(**kw) -> ForaLoRA:
    args = dict(
        calibration=calibration_loader(),
        target_modules=["fc1", "fc2"],
        weight_rank=2,
        lora_rank=4,
        lora_alpha=8,
        progress=False,
    )
    return ForaLoRA(**{**args, **kw})


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    model = MLP()
    base = copy.deepcopy(model)
    probe = torch.randn(16, D_IN)
    with torch.no_grad():
        base_out = base(probe)
    recorder = OutputsAtTrainStart(probe)
    cb = _fora_lora()
    trainer = tiny_trainer(max_steps=60, callbacks=[cb, recorder])
    trainer.fit(model, task_loader())
    return model, base, cb, recorder, base_out, trainer


def test_fit_starts_from_the_base_model_and_counts_trainable_parameters(trained_mlp):
    model, base, cb, recorder, base_out, _ = trained_mlp
    assert recorder.ready == [True, True]
    torch.testing.assert_close(recorder.outputs, base_out, atol=1e-6, rtol=0)
    r_lora, r = 4, 2
    expected = r_lora * (D_IN + D_HID) + r + r_lora * (D_HID + D_OUT) + r
    summary = trainable_parameters(model)
    assert summary.trainable == expected
    assert summary.total == sum(p.numel() for p in base.parameters()) + expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{layer}.lora_{p}" for layer in ("fc1", "fc2") for p in ("A", "B", "delta")
    }


def test_adamw_update_is_confined_to_the_spectral_channel_on_held_out_span_inputs(trained_mlp):
    model, _, cb, *_ = trained_mlp
    assert set(cb.subspaces) == {"fc1", "fc2"}
    held_out = {"fc1": span_inputs(64, seed=11)}
    gen = torch.Generator().manual_seed(12)
    q2 = cb.subspaces["fc2"].basis
    assert not cb.subspaces["fc2"].complement
    held_out["fc2"] = torch.randn(64, q2.shape[1], generator=gen) @ q2.T  # inputs in fc2's calibration span
    for name, x in held_out.items():
        layer = model.get_submodule(name)
        assert layer.lora_B.abs().max() > 1e-3 and layer.lora_delta.abs().max() > 1e-4, f"{name} did not train"
        with torch.no_grad():
            base = layer.base_layer(x) - layer.base_layer.bias
            change = layer(x) - layer.base_layer(x)
            channel = ((x @ layer.fora_v) * layer.lora_delta) @ layer.fora_u.T
            leak = float((change - channel).norm() / base.norm())
            unprojected = layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T  # what plain LoRA would add
        assert leak < 1e-5, f"{name}: leakage {leak:.2e} outside the spectral channel"
        assert float(unprojected.norm() / base.norm()) > 1e-2, f"{name}: the check would not see an unprojected update"
        assert float(change.norm()) > 0


def test_resume_restores_bases_without_recalibrating(trained_mlp, tmp_path, monkeypatch):
    model, _, cb, _, _, trainer = trained_mlp
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    from fora_lightning.protection import Protection

    def no_estimate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("bases re-estimated on resume")

    # the calibration data is read (fingerprint, and the captured-energy check of issue 24) but nothing re-estimated
    monkeypatch.setattr(Protection, "estimate", no_estimate)
    torch.manual_seed(1)
    fresh = MLP()
    cb2 = _fora_lora()
    tiny_trainer(max_steps=63, callbacks=[cb2]).fit(fresh, task_loader(), ckpt_path=ckpt)
    for name in ("fc1", "fc2"):
        before, after = model.get_submodule(name), fresh.get_submodule(name)
        torch.testing.assert_close(after.fora_basis, before.fora_basis, atol=0, rtol=0)
        torch.testing.assert_close(after.base_layer.weight, before.base_layer.weight, atol=0, rtol=0)
        assert not torch.equal(after.lora_B, before.lora_B)  # it trained 3 more steps from there
    with pytest.raises(ValueError, match="lora_alpha"):
        _fora_lora(lora_alpha=3).load_state_dict(cb.state_dict())


def test_injection_is_idempotent_and_refuses_other_settings(trained_mlp):
    model, *_ = trained_mlp
    layers = fora_lora_layers(model)
    assert inject_fora_lora(model, ["fc1", "fc2"], lora_rank=4, lora_alpha=8, weight_rank=2) == layers
    with pytest.raises(ValueError, match="lora_rank=4"):
        inject_fora_lora(model, ["fc1", "fc2"], lora_rank=2, lora_alpha=8, weight_rank=2)
    with pytest.raises(ValueError, match="selects"):
        inject_fora_lora(model, ["fc1"], lora_rank=4, lora_alpha=8, weight_rank=2)


# ---------------------------------------------------------------------------- tiny transformers causal LM
VOCAB, SEQ = 64, 12


class TinyCausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _ids(n: int, seed: int, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained_lm():
    torch.manual_seed(0)
    module = TinyCausalLM()
    base = copy.deepcopy(module.model)
    probe = _ids(4, seed=5)
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
    calibration = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in _ids(16, seed=1, high=VOCAB // 2).split(8)
    ]
    recorder = OutputsAtTrainStart(probe)
    cb = ForaLoRA(calibration=calibration, weight_rank=4, lora_rank=4, lora_alpha=8, lora_dropout=0.1, progress=False)
    train = DataLoader(TensorDataset(_ids(32, seed=2, low=VOCAB // 2)), batch_size=8)
    tiny_trainer(max_steps=12, callbacks=[cb, recorder]).fit(module, train)
    module.eval()
    with torch.no_grad():
        tuned_logits = module(probe)
    return module, base, probe, base_logits, tuned_logits, recorder


def test_lm_starts_equal_to_base_and_training_changes_it(trained_lm):
    module, _, _, base_logits, tuned_logits, recorder = trained_lm
    assert len(fora_lora_layers(module)) == 14 and all(recorder.ready)
    torch.testing.assert_close(recorder.outputs, base_logits, atol=1e-6, rtol=0)
    assert float((tuned_logits - base_logits).abs().max()) > 1e-2


def test_merge_reproduces_logits_and_saves_pretrained(trained_lm, tmp_path):
    module, _, probe, _, tuned_logits, _ = trained_lm
    merged = merge_lora(copy.deepcopy(module.model))
    assert not fora_lora_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, tuned_logits, atol=1e-5, rtol=0)
    from transformers import AutoModelForCausalLM

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, tuned_logits, atol=1e-5, rtol=0)


def test_export_writes_a_peft_layout_adapter_that_reproduces_the_update(trained_lm, tmp_path):
    module, base, probe, _, tuned_logits, _ = trained_lm
    export_lora_adapter(module, tmp_path)  # the LightningModule: names are taken relative to its HF model
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    r = 4 + 4
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == r
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 14
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (r, 128) and b.shape == (64, r)
    rebuilt = copy.deepcopy(base)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                name = key[len("base_model.model.") : -len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                rebuilt.get_submodule(name).weight += (config["lora_alpha"] / config["r"]) * b @ a
        torch.testing.assert_close(rebuilt(input_ids=probe).logits, tuned_logits, atol=1e-5, rtol=0)


def test_export_loads_with_peft(trained_lm, tmp_path):
    peft = pytest.importorskip("peft")
    module, base, probe, _, tuned_logits, _ = trained_lm
    export_lora_adapter(module.model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=probe).logits, tuned_logits, atol=1e-5, rtol=0)


def test_branch_stays_confined_under_bf16_autocast():
    layer, q, x = _random_layer(24, 32, 8, 3, 4, False, seed=4)
    layer = layer.float()
    layer.set_subspace(layer.subspace())  # float32 bases
    xs = (x @ q @ q.T).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(xs).dtype == torch.bfloat16  # the base matmul does run in bf16
        update = layer.update(xs)
    channel = ((xs @ layer.fora_v) * layer.lora_delta) @ layer.fora_u.T
    leak = float((update.float() - channel).norm() / (layer.scaling * (xs @ layer.lora_A.T) @ layer.lora_B.T).norm())
    assert leak < 1e-5, f"leakage {leak:.2e} under autocast"
    assert update.dtype == torch.float32


def test_extend_is_refused_rather_than_reading_unmerged_weights():
    with pytest.raises(ValueError, match="extend_to"):
        _fora_lora(extend_to="next.safetensors")
    assert not hasattr(
        _fora_lora(), "extend"
    )  # FORA.extend reads merged weights: ForaLoRA composes, it does not inherit it
