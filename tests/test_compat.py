"""fora_lightning._compat: each private-API shim does what its callers rely on, and nothing else uses the privates."""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from fora_lightning._compat import (
    forward_redirection,
    hparams_name,
    no_split_module_names,
    reset_hparams,
    sync_trainer_state,
)
from tests.tiny_lm import tiny_llama_config

PACKAGE = Path(__file__).resolve().parents[1] / "fora_lightning"
PRIVATES = (
    "_ForwardRedirection",
    "_current_fx_name",
    "_device_mesh",
    "_hparams",
    "_set_hparams",
    "_hparams_initial",
    "_hparams_name",
    "_handle",
    "_param_infos",
    "_local_shard",
    "_local_tensor",
    "_padded_unsharded_size",
    "_unpadded_unsharded_size",
    "_get_unflat_views",
    "_no_split_modules",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_hf_hook",
)
REPLACED_BY_PUBLIC = {"_local_tensor"}  # DTensor.to_local()


# module.py is the lead's to move onto the _compat functions (then this becomes empty).
class Doubler(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def calibration_step(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self(x)


class Wrapper(nn.Module):
    """A strategy wrapper stand-in: its forward runs pre/post work around the wrapped module's forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args: object) -> object:
        self.calls += 1
        return self.module(*args)


def test_forward_redirection_runs_the_method_inside_the_wrappers_forward():
    torch.manual_seed(0)
    module = Doubler()
    wrapper = Wrapper(module)
    x = torch.randn(2, 3)
    out = forward_redirection(wrapper, module, "calibration_step", x)
    torch.testing.assert_close(out, 2 * module.fc(x))
    assert wrapper.calls == 1
    torch.testing.assert_close(module(x), module.fc(x))  # forward is unpatched afterwards


class Inner(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.fc(batch[0]).pow(2).mean()
        self.log("inner_loss", loss)  # raises unless the hook name was synced
        return loss


class Outer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        sync_trainer_state(self.inner, self)
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sync_trainer_state_lets_a_wrapped_module_log_and_see_the_mesh(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(Outer(), data)
    assert "inner_loss" in trainer.callback_metrics
    outer, mesh = Outer(), object()
    outer._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
    sync_trainer_state(outer.inner, outer)
    assert outer.inner.device_mesh is mesh


class Saved(pl.LightningModule):
    def __init__(self, a: int = 1, b: str = "x") -> None:
        super().__init__()
        self.save_hyperparameters()


class SavedNamespace(pl.LightningModule):
    def __init__(self, config: Namespace) -> None:
        super().__init__()
        self.save_hyperparameters(config)


def test_reset_hparams_replaces_hparams_and_hparams_initial():
    module = Saved(a=5)
    container = type(module.hparams)
    reset_hparams(module, {"c": 3})
    assert dict(module.hparams) == {"c": 3} and type(module.hparams) is container
    assert dict(module.hparams_initial) == {"c": 3}
    module.hparams["c"] = 4
    assert dict(module.hparams_initial) == {"c": 3}  # an own copy, as save_hyperparameters makes


def test_hparams_name_is_what_save_hyperparameters_recorded():
    assert hparams_name(Saved()) == "kwargs"
    assert hparams_name(SavedNamespace(Namespace(lr=0.1))) == "config"
    assert hparams_name(Doubler()) == "kwargs"  # never saved


def test_no_split_module_names_of_a_hf_model_and_of_a_plain_module():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config()))
    names = no_split_module_names(model)
    assert names == {"LlamaDecoderLayer"}
    assert names <= {type(m).__name__ for m in model.modules()}
    assert no_split_module_names(nn.Linear(2, 2)) == set()


def _privates_used(path: Path) -> set[str]:
    text = path.read_text()
    return {name for name in PRIVATES if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)}


def test_private_apis_appear_only_in_compat():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "_compat.py" and (used := _privates_used(path)):
            found[rel] = used
    assert found == {}
    assert _privates_used(PACKAGE / "_compat.py") == set(PRIVATES) - REPLACED_BY_PUBLIC


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_does_not_import_compat(path: Path):
    assert "_compat" not in path.read_text()
