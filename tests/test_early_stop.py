"""The calibration early stop (core/early_stop.py): the same covariances as the whole forward, the model untouched,
no lm_head call after the reference batch, and the whole forward wherever stopping is not safe."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from fora_lightning import FORA
from fora_lightning.calibration import early_stop_safe
from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.targets import find_targets
from tests.tiny_lm import tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_BATCHES = 4


class CountingLinear(nn.Linear):
    """An ``nn.Linear`` that counts its completed forwards (no hook: hooks turn the early stop off in the glue)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.calls += 1
        return out


def _counting_head(model: nn.Module) -> CountingLinear:
    old = model.lm_head
    head = CountingLinear(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    model.lm_head = head
    return head


def _lm(kind: str) -> nn.Module:
    cfg = tiny_llama_config(40)
    if kind == "qwen3":
        cfg = {**cfg, "model_type": "qwen3", "head_dim": 8}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))


def _batches(seed: int, n: int = N_BATCHES) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 40, (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # right padding
        mask[2, :3] = 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("panel", [0, 16])
def test_early_stop_gives_the_very_same_covariances_and_skips_the_lm_head(kind, panel):
    model = _lm(kind)
    head = _counting_head(model)
    targets = find_targets(model, TARGETS)
    data = _batches(1)
    got = {}
    for stop in (False, True):
        head.calls = 0
        got[stop] = collect_covariances(model, targets, data, lambda b: model(**b), panel=panel, stop_early=stop)
        got[stop, "head"] = head.calls
    assert got[False, "head"] == N_BATCHES
    assert got[True, "head"] == 1  # the reference batch only
    full, early = got[False], got[True]
    assert full.owner == early.owner and full.counts == early.counts
    assert full.sums.keys() == early.sums.keys()
    for o in full.sums:
        assert torch.equal(full.sums[o], early.sums[o]), o


def test_the_model_is_left_as_found_after_a_stopped_pass():
    model = _lm("qwen3")
    model.train()
    model.model.layers[1].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    probe = _batches(9, 1)[0]
    with torch.no_grad():
        before = model(**probe).logits
    hooks = _hook_count(model)
    head = _counting_head(model)
    collect_covariances(model, find_targets(model, TARGETS), _batches(2), lambda b: model(**b), stop_early=True)
    assert _hook_count(model) == hooks
    assert {n: m.training for n, m in model.named_modules()} == flags
    head.calls = 0
    with torch.no_grad():
        after = model(**probe).logits
    assert head.calls == 1 and torch.equal(before, after)


class Reused(nn.Module):
    """One Linear applied twice per forward: after its first call every target has been seen, yet it runs again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.head = nn.Linear(6, 6), CountingLinear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.tanh(self.block(x))))


def test_a_target_called_twice_per_forward_keeps_the_whole_forward():
    model = Reused()
    data = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    full = collect_covariances(model, {"block": model.block}, data, model, stop_early=False)
    model.head.calls = 0
    early = collect_covariances(model, {"block": model.block}, data, model, stop_early=True)
    assert model.head.calls == 3
    assert early.counts == full.counts == {"block": 30}
    assert torch.equal(early.sums["block"], full.sums["block"])


class Swallower(nn.Module):
    """A forward whose ``except BaseException`` eats whatever its layer raises and goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.fc(x)
        except BaseException:  # noqa: BLE001 - the point of the test
            return x


def test_a_model_that_swallows_the_stop_is_an_error_naming_the_setting():
    model = Swallower()
    data = [torch.randn(3, 4) for _ in range(2)]
    with pytest.raises(RuntimeError, match="calibration_early_stop=False"):
        collect_covariances(model, {"fc": model.fc}, data, model, stop_early=True)


def test_early_stop_is_safe_on_one_device_and_ddp_only():
    model = nn.Sequential(nn.Linear(3, 3))
    assert early_stop_safe(SingleDeviceStrategy(torch.device("cpu")), model)
    assert early_stop_safe(DDPStrategy(), model)
    for unsafe in (FSDPStrategy(), ModelParallelStrategy(), type("MyDDP", (DDPStrategy,), {})()):
        assert not early_stop_safe(unsafe, model), type(unsafe).__name__


def test_foreign_forward_hooks_turn_the_early_stop_off_but_transformers_output_capturing_does_not():
    one = SingleDeviceStrategy(torch.device("cpu"))
    model = _lm("qwen3")
    with torch.no_grad():
        model(**_batches(0, 1)[0], output_hidden_states=True)  # installs transformers' output-capturing hooks
    assert _hook_count(model) > 0 and early_stop_safe(one, model)
    for where in (model.model.norm, model.lm_head):
        h = where.register_forward_hook(lambda m, a, out: None)
        assert not early_stop_safe(one, model)
        h.remove()
    h = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        assert not early_stop_safe(one, model)
    finally:
        h.remove()
    assert early_stop_safe(one, model)


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _lm("llama")
        self.head = _counting_head(self.model)

    def forward(self, **batch: torch.Tensor) -> object:
        return self.model(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch, labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class HeadCalls(pl.Callback):
    """The lm_head's forwards when training starts: those of FORA's calibration (at fit start)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: TinyLM) -> None:
        self.calls.append(pl_module.head.calls)


@pytest.mark.parametrize("stop", [True, False])
def test_fora_default_stops_early_on_one_device_with_the_same_bases(stop):
    bases = {}
    for early in (stop, not stop):
        module = TinyLM()
        fora = FORA(calibration=_batches(3), target_modules=TARGETS, progress=False, calibration_early_stop=early)
        seen = HeadCalls()
        tiny_trainer(max_steps=1, callbacks=[fora, seen]).fit(module, DataLoader(_batches(4, 2), batch_size=None))
        # calibration's lm_head calls (the reference batch only when stopping early), plus one: the sentinel keeps the
        # base logits of its probe batch (the calibration hold-out slice) for the report's KL
        assert seen.calls == [(1 if early else N_BATCHES) + 1]
        bases[early] = {n: s.basis for n, s in fora.subspaces.items()}
    assert bases[True].keys() == bases[False].keys()
    for n in bases[True]:
        assert torch.equal(bases[True][n], bases[False][n]), n
