"""The guarantee on a tiny transformers causal LM (Llama architecture, built from a config)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from conftest import tiny_trainer
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from fora_lightning import FORA
from fora_lightning.core.projection import right_project
from fora_lightning.metrics import leakage

VOCAB = 64


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _batches(n: int, seed: int, low: int, high: int, pad: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(low, high, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _layer_inputs(model: TinyLM, batches, names) -> dict[str, torch.Tensor]:
    """Each target layer's real inputs on held-out batches (non-padding rows)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def protected_tiny_llama(weight_rank: int = 4):
    """A TinyLM whose q/o/down projections alone train, their bases from 6 calibration batches (energy 0.99),
    and held-out inputs of the same span: ``(model, names, targets, w0, held, subspaces, train_batches)``."""
    from fora_lightning.core.subspace import SubspaceConfig, build_subspace, spectrum

    model = TinyLM()
    mods = dict(model.named_modules())
    names = [n for n in mods if n.rsplit(".", 1)[-1] in ("q_proj", "o_proj", "down_proj")]
    targets = {n: mods[n] for n in names}
    w0 = {n: m.weight.detach().clone() for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    held = _layer_inputs(model, _batches(3, seed=7, low=0, high=VOCAB // 2), names)
    calib = _layer_inputs(model, _batches(6, seed=1, low=0, high=VOCAB // 2), names)
    cfg = SubspaceConfig(energy=0.99, weight_rank=weight_rank)
    subs = {n: build_subspace(n, w0[n], cfg, spectrum(calib[n].T @ calib[n] / len(calib[n]))) for n in names}
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]
    return model, names, targets, w0, held, subs, train


def test_tiny_llama_update_mode_confines_change_to_spectral_channel():
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    base = TinyLM()
    model = copy.deepcopy(base)
    calibration = _batches(
        6, seed=1, low=0, high=VOCAB // 2, pad=True
    )  # the capability: the first half of the vocabulary
    train = [dict(b, labels=b["input_ids"]) for b in _batches(8, seed=2, low=VOCAB // 2, high=VOCAB)]  # the new task
    cb = FORA(calibration=calibration, target_modules=targets, energy=0.99, weight_rank=4, progress=False)
    tiny_trainer(max_steps=120, callbacks=[cb]).fit(model, DataLoader(train, batch_size=None))
    plain = copy.deepcopy(base)
    tiny_trainer(max_steps=120).fit(plain, DataLoader(train, batch_size=None))

    groups = {n: m for n, m in cb.protection.targets.items()}
    assert {n.rsplit(".", 1)[-1] for n in groups} == set(targets)
    held_out = _layer_inputs(base, _batches(3, seed=7, low=0, high=VOCAB // 2), list(groups))
    base_mods, plain_mods = dict(base.named_modules()), dict(plain.named_modules())
    for name, module in groups.items():
        sub = cb.subspaces[name]
        x = held_out[name].double()
        x_span = x - right_project(x, sub.basis.double(), sub.complement)  # the held-out inputs' component in span(Q)
        w0 = base_mods[name].weight.detach()
        d = (module.weight.detach() - w0).double()
        u, v = sub.u.double(), sub.v.double()
        channel = u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
        assert float(d.norm() / w0.norm()) > 0.05, name  # the weights really moved
        leak = leakage(d - channel, w0, x_span)
        assert leak < 1e-5, name
        plain_leak = leakage(plain_mods[name].weight - w0, w0, x_span)
        assert plain_leak > 0.1 and plain_leak > 1e3 * leak, name


def test_extend_grows_a_shared_input_once_and_as_each_layer_alone_would():
    """q/k/v read one input with one basis tensor: FORA.extend grows it once, and the result equals per-layer growth."""
    from fora_lightning.core.capabilities import extend_subspace

    model = TinyLM()
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    calibration = _batches(4, seed=1, low=0, high=VOCAB // 2)
    train = [dict(b, labels=b["input_ids"]) for b in _batches(4, seed=2, low=VOCAB // 2, high=VOCAB)]
    cb = FORA(calibration=calibration, target_modules=targets, energy=0.9, weight_rank=2, progress=False)
    trainer = tiny_trainer(max_steps=4, callbacks=[cb])
    trainer.fit(model, DataLoader(train, batch_size=None))
    before = dict(cb.subspaces)
    new_task = _batches(4, seed=3, low=VOCAB // 2, high=VOCAB)
    merged = cb.extend(trainer, model, calibration=new_task)
    qkv = [f"model.model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert merged[qkv[0]].basis is merged[qkv[1]].basis is merged[qkv[2]].basis
    assert merged[qkv[0]].k > before[qkv[0]].k
    covariances = cb.protection.calibrate(trainer, model, new_task)
    for name in (qkv[1], "model.model.layers.1.mlp.up_proj"):
        weight = cb.protection.targets[name].weight.detach()
        alone, _ = extend_subspace(before[name], weight, covariances.covariance(name), 0.9, 2)
        torch.testing.assert_close(_span(merged[name]), _span(alone), atol=1e-5, rtol=0)
        assert merged[name].k == alone.k


def _span(sub) -> torch.Tensor:
    """The projector onto span(Q), whether the basis is stored as Q or as its complement."""
    p = sub.basis @ sub.basis.T
    return torch.eye(sub.d_in, dtype=p.dtype, device=p.device) - p if sub.complement else p
