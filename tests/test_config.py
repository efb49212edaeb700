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
    shared = ForaConfig(**{k: v for k, v in SETTINGS.items() if k != "mode"})  # mode is FORA's alone
    lora = ForaLoRA(config=shared)
    assert lora.config.lora_rank == 8 and {k: v for k, v in lora.config.to_dict().items() if k != "lora_rank"} == {
        k: v for k, v in shared.to_dict().items() if k != "lora_rank"
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
        (dict(covariance_panel=2.5), "covariance_panel must be an int"),
        # issue 24 item 3: wrong types refused, as a constructor's keywords would be
        (dict(energy="0.99"), r"energy must be a number, got '0.99'"),
        (dict(lora_alpha=0), "lora_alpha must be a finite number > 0"),
        (dict(freeze_other="no"), "freeze_other must be True or False, got 'no'"),
        (dict(progress=1), "progress must be True or False"),
        (dict(seed=1.5), "seed must be an int"),
        (dict(subspaces=3), "subspaces must be a string or None"),
        (dict(capability_weights={"a": "x"}), r"capability_weights must be a mapping str -> float"),
        (dict(capability_weights={"a": -1.0}), "capability_weights must be finite and >= 0"),
        (dict(target_modules=["fc1", 2]), "target_modules must be a string or a list of str"),
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
    assert cb.state_dict()["config"] == config.record()  # runtime settings (subspaces, progress) stay out
    assert read_metadata(config.subspaces)["config"] == config.record()
    assert "subspaces" not in config.record() and "progress" not in config.record()
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


# ------------------------------------------------------------------ issue 23 goal 3, issue 24 item 3
def test_every_field_declares_its_tier_and_the_compared_lists_follow_from_it():
    from fora_lightning.config import BASIS_SETTINGS, LORA_SETTINGS, LORA_STRUCTURE, RUNTIME_SETTINGS, SAVED_SETTINGS

    tiers = {f.name: f.metadata.get("tier") for f in fields(ForaConfig)}
    assert set(tiers.values()) <= {"bases", "step", "runtime"}, tiers
    assert set(BASIS_SETTINGS) == {n for n, t in tiers.items() if t == "bases"}
    assert set(SAVED_SETTINGS) == {n for n, t in tiers.items() if t != "runtime"}
    assert set(RUNTIME_SETTINGS) | set(SAVED_SETTINGS) == set(tiers)
    assert {"energy", "rank", "weight_rank", "target_modules", "covariance_product"} <= set(BASIS_SETTINGS)
    assert {"progress", "covariance_panel", "calibration_early_stop", "subspaces"} <= set(RUNTIME_SETTINGS)
    assert LORA_SETTINGS == ("lora_rank", "lora_alpha", "lora_dropout")
    assert set(LORA_STRUCTURE) == {"target_modules", "weight_rank", "lora_rank", "lora_alpha"}
    for removed in ("allocation", "covariance_token_stride"):  # measured, not adopted (results/ keep them)
        assert removed not in tiers


def test_a_mapping_config_is_checked_like_keywords():
    for build in (lambda c: FORA(config=c), lambda c: ForaLoRA(config=c), lambda c: ForaModule(MLP(), config=c)):
        with pytest.raises(TypeError, match=r"unknown FORA setting\(s\) \['energyy'\] \(config=\).*energy"):
            build({"energyy": 0.5})
        with pytest.raises(TypeError, match="energy must be a number"):
            build({"energy": "0.5"})
        assert build({"energy": 0.5}).config.energy == 0.5
    assert ForaConfig.from_dict({"energy": 0.5, "allocation": "trace"}).energy == 0.5  # old records: lenient


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda: FORA(lora_rank=8), r"FORA does not use lora_rank=8 .*use ForaLoRA"),
        (lambda: FORA(lora_alpha=32.0, lora_dropout=0.1), r"FORA does not use lora_alpha=32.0, lora_dropout=0.1"),
        (lambda: FORA(config=ForaConfig(lora_rank=4)), "FORA does not use lora_rank=4"),
        (lambda: ForaLoRA(mode="gradient"), r"ForaLoRA does not use mode='gradient'"),
        (
            lambda: ForaLoRA(precision="bf16", offload_anchors=True),
            r"ForaLoRA does not use precision='bf16', offload_anchors=True",
        ),
        (lambda: ForaLoRA(project_gradients=False), "ForaLoRA has no gradient projection to skip"),
        (lambda: ForaModule(MLP(), lora_rank=4, mode="gradient"), r"ForaLoRA does not use mode='gradient'"),
        (lambda: ForaModule(MLP(), lora_alpha=4.0), r"FORA does not use lora_alpha=4.0"),
    ],
)
def test_a_setting_the_receiving_callback_does_not_read_is_refused_by_name(build, named):
    with pytest.raises(ValueError, match=named):
        build()


def test_calibration_settings_with_another_source_are_refused():
    """source='weights' / 'random' build bases without calibration data: a calibration-only setting moved from its
    default would be ignored, so it is refused by name; every default is accepted."""
    with pytest.raises(ValueError, match=r"calibration_holdout, calibration_samples only shape the calibration pass, "
                       r"but source='weights'"):  # fmt: skip
        ForaConfig(source="weights", calibration_holdout=0, calibration_samples=2)
    with pytest.raises(ValueError, match="covariance_dtype only shape"):
        FORA(source="random", covariance_dtype="float64")
    calibration = [f.name for f in fields(ForaConfig) if f.metadata.get("calibration")]
    assert "calibration_holdout" in calibration and "energy" not in calibration and "target_modules" not in calibration
    ForaConfig(source="random")
    ForaConfig(source="weights", energy=0.9, weight_rank=4)
