"""ForaConfig is the one source of FORA's settings: every entry point reads it, every record writes it."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from conftest import MLP, calibration_loader, task_loader, tiny_trainer

from fora_lightning import FORA, ForaConfig, ForaLoRA, ForaModule
from fora_lightning.core.subspace_file import read_metadata
from fora_lightning.module import CHECKPOINT_KEY


class CalibratedMLP(MLP):
    def calibration_dataloader(self):
        return calibration_loader()


SETTINGS = dict(target_modules=["fc1", "fc2"], energy=0.9, weight_rank=2, mode="gradient", progress=False, seed=3)


def test_every_entry_point_holds_the_same_config():
    config = ForaConfig(**SETTINGS)
    assert FORA(config=config).config == config
    assert FORA(**SETTINGS).config == config  # keywords are the same settings
    assert FORA(config=ForaConfig(energy=0.5), **SETTINGS).config == config  # keywords apply over config
    assert ForaModule(MLP(), config).configure_callbacks()[-1].config == config
    lora = ForaLoRA(config=config)
    assert lora.config.lora_rank == 8 and {k: v for k, v in lora.config.to_dict().items() if k != "lora_rank"} == {
        k: v for k, v in config.to_dict().items() if k != "lora_rank"
    }


def test_unknown_setting_is_a_type_error_naming_the_settings():
    for build in (lambda: FORA(enrgy=0.9), lambda: ForaLoRA(enrgy=0.9), lambda: ForaModule(MLP(), enrgy=0.9)):
        with pytest.raises(TypeError, match=r"unknown FORA setting\(s\) \['enrgy'\].*energy"):
            build()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(rank=0), "rank must be >= 1"),
        (dict(rank=-2), "rank must be >= 1"),
        (dict(rank=2.7), "whole number"),
        (dict(rank={"fc1": 0}), "for layer 'fc1'"),
        (dict(max_rank=0), "max_rank must be an int >= 1"),
        (dict(weight_rank=-1), "weight_rank must be an int >= 0"),
        (dict(energy=0.0), "energy must lie in"),
        (dict(mode="weights"), "mode must be 'update' or 'gradient'"),
        (dict(combine="sum"), "combine must be"),
        (dict(lora_rank=0), "lora_rank must be an int >= 1"),
        (dict(target_modules=3), "target_modules must be"),
        (dict(covariance_panel=-1), "covariance_panel must be an int >= 0 .*got -1"),
        (dict(covariance_token_stride=0), "covariance_token_stride must be an int >= 1 .*got 0"),
        (dict(covariance_token_stride=2.5), "covariance_token_stride must be an int"),
        (dict(covariance_product="bf16"), "covariance_product must be 'accumulator' or 'input', got 'bf16'"),
    ],
)
def test_bad_settings_fail_at_construction_everywhere(bad, message):
    for build in (lambda: ForaConfig(**bad), lambda: FORA(**bad), lambda: ForaModule(MLP(), **bad)):
        with pytest.raises((ValueError, TypeError), match=message):
            build()


def test_config_round_trips_through_dict_and_old_flat_records():
    config = ForaConfig(**SETTINGS, rank={"fc1": 3, "fc2": 4}, capability_weights={"a": 2.0})
    assert ForaConfig.from_dict(config.to_dict()) == config
    flat = {"class_path": "x.Y", **config.to_dict()}  # a checkpoint written before ForaConfig: settings flat
    assert ForaConfig.from_dict(flat) == config
    assert [f.name for f in fields(ForaConfig) if not f.metadata.get("help")] == []  # every field documents itself


def test_state_dict_file_header_and_checkpoint_record_the_config(tmp_path):
    torch.manual_seed(0)
    config = ForaConfig(**{**SETTINGS, "mode": "update"}, subspaces=str(tmp_path / "s.safetensors"))
    model = ForaModule(CalibratedMLP(), config)
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=task_loader())
    cb = next(c for c in trainer.callbacks if isinstance(c, FORA))
    assert cb.state_dict()["config"] == config.to_dict()
    assert read_metadata(config.subspaces)["config"] == config.to_dict()
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert saved["config"] == config.to_dict()
    assert ForaModule.load_from_checkpoint(tmp_path / "m.ckpt", module_class=CalibratedMLP).config == config


def test_lightning_cli_refuses_bad_settings_at_parse_time(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    with pytest.raises(ValueError, match="rank must be >= 1"):  # from the parser, before any model is built
        LightningCLI(
            args=[
                "fit",
                "--model",
                "fora_lightning.ForaModule",
                "--model.init_args.module",
                "conftest.MLP",
                "--model.init_args.config.rank",
                "0",
                "--trainer.default_root_dir",
                str(tmp_path),
            ],
            run=True,
        )
