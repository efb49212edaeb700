"""QLoRA: FORA-LoRA over a tiny Llama whose target linears are bitsandbytes 4-bit (and 8-bit) layers, quantized on CPU.

Bases from the dequantized W0 (against a float64 SVD), AdamW leakage outside the spectral channel <= 1e-5 on held-out
span(Q) inputs, the exported adapter reproduces the logits when PEFT loads it onto the same quantized model, merging is
refused (or dequantizes into float nn.Linear layers on request). Needs bitsandbytes (the ``qlora`` extra): skipped without.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_trainer
from tiny_lm import tiny_llama_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fora_lightning import FORA, ForaLoRA, export_lora_adapter, merge_lora
from fora_lightning.core.subspace import complement_basis
from fora_lightning.core.targets import DEFAULT_TARGETS, dense_weight, find_targets, is_quantized
from fora_lightning.lora import fora_lora_layers

bnb = pytest.importorskip("bitsandbytes")

SEQ = 12
# bitsandbytes' CPU kernels need d_in >= its 64-wide quantization block and d_out a multiple of 32
CONFIG = tiny_llama_config() | {"hidden_size": 64, "intermediate_size": 128}
VOCAB = CONFIG["vocab_size"]


def quantize_targets(model: nn.Module, kind: str) -> nn.Module:
    """Replace every default-target ``nn.Linear`` of ``model`` by a bitsandbytes ``Linear4bit`` (NF4) or ``Linear8bitLt``
    holding its weight, quantized on CPU (bitsandbytes quantizes on ``.to(device)``)."""
    for name, lin in find_targets(model, DEFAULT_TARGETS).items():
        bias = lin.bias is not None
        if kind == "4bit":
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.float32, quant_type="nf4"
            )
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q.support_avx512bf16_for_cpu = False  # no CPU-only repacking to a bf16 GEMM (test_cpu_repacked_weight_...)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if bias:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


class QuantizedLM(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.model = quantize_targets(LlamaForCausalLM(LlamaConfig(**CONFIG)), kind)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _ids(n: int, seed: int, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, (n, SEQ), generator=torch.Generator().manual_seed(seed))


class LogitsAtTrainStart(pl.Callback):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.logits = ids, None

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            self.logits = pl_module(self.ids).clone()


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def trained(request):
    module = QuantizedLM(request.param)
    assert all(is_quantized(m) for m in find_targets(module.model, DEFAULT_TARGETS).values())
    base = copy.deepcopy(module.model)
    probe = _ids(4, seed=5, low=4, high=VOCAB)
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
    calibration = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in _ids(16, 1, 4, VOCAB // 2).split(8)
    ]
    recorder = LogitsAtTrainStart(probe)
    cb = ForaLoRA(calibration=calibration, weight_rank=4, lora_rank=4, lora_alpha=8, progress=False)
    train = DataLoader(TensorDataset(_ids(32, seed=2, low=VOCAB // 2, high=VOCAB)), batch_size=8)
    tiny_trainer(max_steps=12, callbacks=[cb, recorder]).fit(module, train)
    module.eval()
    with torch.no_grad():
        tuned_logits = module(probe)
    return request.param, module, base, cb, probe, base_logits, tuned_logits, recorder


def test_fit_starts_from_the_quantized_base_and_changes_it(trained):
    _, module, _, _, _, base_logits, tuned_logits, recorder = trained
    layers = fora_lora_layers(module)
    assert len(layers) == 14 and all(layer.ready and is_quantized(layer.base_layer) for layer in layers.values())
    torch.testing.assert_close(recorder.logits, base_logits, atol=1e-6, rtol=0)
    assert float((tuned_logits - base_logits).abs().max()) > 1e-2
    assert {n.rpartition(".")[2] for n, p in module.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
        "lora_delta",
    }


def test_bases_are_the_dequantized_weights_singular_triplets(trained):
    kind, module, _, cb, *_ = trained
    for name, layer in fora_lora_layers(module).items():
        base = layer.base_layer
        w0 = dense_weight(base)
        assert w0.shape == (layer.out_features, layer.in_features) and w0.dtype.is_floating_point
        if kind == "4bit":  # packed: the stored shape is not the matrix
            assert tuple(base.weight.shape) != tuple(w0.shape)
            x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(base(x), x @ w0.T, atol=1e-5, rtol=0)  # the 4-bit forward is x W0^T exactly
        s = torch.linalg.svdvals(w0.double())[: layer.weight_rank]
        torch.testing.assert_close(cb.subspaces[name].s.double(), s, atol=1e-4, rtol=1e-4)
        u = cb.subspaces[name].u.double()  # W0 V_r = U_r S_r
        torch.testing.assert_close(w0.double() @ cb.subspaces[name].v.double(), u * s, atol=1e-4, rtol=1e-4)


def test_adamw_update_is_confined_to_the_spectral_channel_on_held_out_span_inputs(trained):
    _, module, _, cb, *_ = trained
    gen = torch.Generator().manual_seed(12)
    checked = 0
    for name, layer in fora_lora_layers(module).items():
        sub = cb.subspaces[name]
        if sub.k == 0:
            continue
        q = complement_basis(sub.basis) if sub.complement else sub.basis
        x = torch.randn(64, q.shape[1], generator=gen) @ q.T  # held-out inputs in the calibration span
        with torch.no_grad():
            base = layer.base_layer(x)
            change = layer(x) - base
            channel = ((x @ layer.fora_v) * layer.lora_delta) @ layer.fora_u.T
            unprojected = layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T  # what plain QLoRA would add
        leak = float((change - channel).norm() / base.norm())
        assert leak <= 1e-5, f"{name}: leakage {leak:.2e} outside the spectral channel"
        assert float(unprojected.norm() / base.norm()) > 1e-3, f"{name}: the check would not see an unprojected update"
        checked += 1
    assert checked >= 10


def test_exported_adapter_loads_with_peft_onto_the_quantized_model(trained, tmp_path):
    peft = pytest.importorskip("peft")
    _, module, base, _, probe, _, tuned_logits, _ = trained
    export_lora_adapter(module.model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert is_quantized(wrapped.base_layer)  # PEFT's LoRA layer over the same quantized weight
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=probe).logits, tuned_logits, atol=1e-5, rtol=0)


def test_merge_is_refused_unless_dequantized(trained):
    kind, module, _, _, probe, _, tuned_logits, _ = trained
    model = copy.deepcopy(module.model)
    with pytest.raises(
        TypeError, match=r"merge_lora: FORA-LoRA layer 'model\.layers\.0\.self_attn\.q_proj' wraps .*re-quantize"
    ):
        merge_lora(model)
    assert len(fora_lora_layers(model)) == 14  # nothing was unwrapped
    expected = {
        n: dense_weight(layer.base_layer).double() + layer.delta_weight()
        for n, layer in fora_lora_layers(model).items()
    }
    merged = merge_lora(model, dequantize=True)
    assert not fora_lora_layers(merged)
    for name, w in expected.items():
        linear = merged.get_submodule(name)
        assert type(linear) is nn.Linear and not linear.weight.requires_grad
        torch.testing.assert_close(linear.weight.double(), w, atol=1e-6, rtol=0)
    if kind == "4bit":  # 8-bit's forward also quantizes the activations, so a float layer differs more from it
        with torch.no_grad():
            logits = merged(input_ids=probe).logits
        torch.testing.assert_close(logits, tuned_logits, atol=1e-4, rtol=0)


def test_full_fora_over_a_real_linear4bit_is_refused():
    module = QuantizedLM("4bit")
    cb = FORA(calibration=[{"input_ids": _ids(2, 1, 4, VOCAB)}], progress=False)
    train = DataLoader(TensorDataset(_ids(8, seed=2, low=4, high=VOCAB)), batch_size=4)
    with pytest.raises(
        TypeError,
        match=r"cannot protect quantized layers: 'model\.model\.layers\.0\.self_attn\.q_proj' is a Linear4bit",
    ):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(module, train)


def test_cpu_repacked_weight_is_dequantized_as_its_forward_reads_it():
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight at the first eval no-grad forward (bf16 scales and
    GEMM); :func:`dense_weight` unpacks copies, leaving the layer as it is."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False)
    q = q.to("cpu").eval()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = q(x)
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    packed = q.weight.data.clone()
    w0 = dense_weight(q)
    assert torch.equal(q.weight.data, packed) and q.weight.quant_state.packing_format_for_cpu  # untouched
    assert w0.shape == (64, 64)
    assert float((x @ w0.T - y).norm() / y.norm()) < 1e-2  # the bf16 GEMM's rounding
    assert float((w0 - lin.weight).norm() / lin.weight.norm()) < 0.2  # NF4's own error, not garbage
