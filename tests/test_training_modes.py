"""FORA's guarantee under the training modes an LLM team turns on: gradient checkpointing, gradient accumulation,
a ``torch.compile``d model. Each keeps leakage <= 1e-5 on held-out span inputs (calibration-like, not calibrated on)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_trainer
from test_callback_llm import _batches, _layer_inputs
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from fora_lightning import FORA
from fora_lightning.core.projection import right_project
from fora_lightning.metrics import leakage

VOCAB = 64
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


class TinyLM(pl.LightningModule):
    """Llama, hidden 64, 2 layers; ``checkpointing`` turns on HF gradient checkpointing, ``compile`` wraps it in torch.compile with that backend."""

    def __init__(self, checkpointing: bool = False, compile: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        self.model = torch.compile(model, backend=compile) if compile else model

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _fit_and_leakage(model: TinyLM, **trainer_kw) -> tuple[float, float]:
    """(max leakage over target layers, min relative weight change) after a FORA fit."""
    base = copy.deepcopy(model)
    calibration = _batches(6, seed=1, low=0, high=VOCAB // 2, pad=True)
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]
    cb = FORA(calibration=calibration, target_modules=TARGETS, energy=0.99, weight_rank=4, progress=False)
    tiny_trainer(callbacks=[cb], **{"max_steps": 12, **trainer_kw}).fit(model, DataLoader(train, batch_size=None))
    assert {n.rsplit(".", 1)[-1] for n in cb.protection.targets} == set(TARGETS)
    held_out = _layer_inputs(base, _batches(3, seed=7, low=0, high=VOCAB // 2), list(cb.protection.targets))
    base_mods = dict(base.named_modules())
    leaks, moved = [], []
    for name, module in cb.protection.targets.items():
        sub = cb.subspaces[name]
        x = held_out[name].double()
        x_span = x - right_project(x, sub.basis.double(), sub.complement)
        w0 = base_mods[name].weight.detach()
        d = (module.weight.detach() - w0).double()
        u, v = sub.u.double(), sub.v.double()
        channel = u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
        leaks.append(leakage(d - channel, w0, x_span))
        moved.append(float(d.norm() / w0.norm()))
    return max(leaks), min(moved)


@pytest.mark.parametrize(
    ("model_kw", "trainer_kw"),
    [
        pytest.param({"checkpointing": True}, {}, id="gradient_checkpointing"),
        pytest.param({}, {"accumulate_grad_batches": 4, "max_steps": 6}, id="accumulate_grad_batches=4"),
        # torch.compile works with FORA's hooks and projection, but tracing the Llama costs ~44 s on 2 CPU cores even
        # aot_eager (dynamo + AOTAutograd, ~15 s with the warm-up) in the default suite; eager and inductor
        # (~150 s of C++ compilation on 2 cores) only in the slow run
        pytest.param({"compile": "eager"}, {}, id="torch_compile_eager", marks=pytest.mark.slow),
        pytest.param({"compile": "aot_eager"}, {}, id="torch_compile_aot_eager"),
        pytest.param({"compile": "inductor"}, {}, id="torch_compile_inductor", marks=pytest.mark.slow),
    ],
)
def test_training_mode_keeps_leakage_below_1e_5(model_kw, trainer_kw):
    model = TinyLM(**model_kw)
    if model_kw.get("checkpointing"):
        assert model.model.is_gradient_checkpointing
    leak, moved = _fit_and_leakage(model, **trainer_kw)
    assert moved > 1e-2  # every target really trained
    assert leak <= 1e-5
