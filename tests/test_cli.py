"""cli.py: the wrapper from YAML (nested class_path) fits, protects and checkpoints; shipped configs parse."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from experiments.examples import Regressor
from fora_lightning import FORA, ForaModule
from fora_lightning.trainer_progress import StepBudgetProgressBar

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
QWEN_CONFIGS = ["qwen3_cogs_keep_translation", "qwen3_gsm8k_keep_translation", "qwen3_translation_keep_math"]


class RecordW0(pl.Callback):
    """Keeps every Linear weight as training starts (W0), for the leakage check: FORA itself keeps no copy of W0."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.w0 = {n: m.weight.detach().clone() for n, m in pl_module.named_modules() if isinstance(m, torch.nn.Linear)}


def load_cli():
    spec = importlib.util.spec_from_file_location("fora_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_flat_fora_settings_under_fora_module_name_the_fix(tmp_path, capsys):
    """A ForaConfig field given to ForaModule itself (not under ``config:``): the error says where it goes."""
    config = yaml.safe_load((ROOT / "configs/wrap_existing.yaml").read_text())
    init_args = config["model"]["init_args"]
    init_args.update(init_args.pop("config"))  # target_modules, energy, ... flat beside `module`
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump(config))
    for args in (
        ["--config", str(flat)],
        ["--config", str(ROOT / "configs/wrap_existing.yaml"), "--model.init_args.energy", "0.9"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            load_cli().main(["fit", *args, "--print_config"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "FORA: '" in err and "is a FORA setting (fora_lightning.ForaConfig)" in err
        assert "goes inside 'config:'" in err and "--model.init_args.config." in err
    with pytest.raises(SystemExit):  # any other parse error reads as before
        load_cli().main(["fit", "--config", str(ROOT / "configs/wrap_existing.yaml"), "--trainer.bogus", "1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.bogus 1" in err and "FORA:" not in err


def test_the_cli_progress_bar_reads_epoch_not_epoch_minus_two(tmp_path):
    """Under a max_steps budget the Rich bar is titled 'Epoch n' (Lightning's own: 'Epoch n/-2')."""
    cli = load_cli().main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/wrap_existing.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_model_summary",
            "false",
            "--model.init_args.config.progress",
            "false",
        ]
    )
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepBudgetProgressBar) and cli.trainer.max_epochs == -1
    assert bar._get_train_description(4).strip() == "Epoch 4"


def test_wrap_existing_yaml_fits_protects_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    cli = load_cli().main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/wrap_existing.yaml"),
            "--trainer.max_steps",
            "30",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.init_args.config.progress",
            "false",
            "--trainer.callbacks+=tests.test_cli.RecordW0",
        ]
    )
    wrapped, data = cli.model, cli.datamodule
    assert isinstance(wrapped, ForaModule) and isinstance(wrapped.module, Regressor)
    assert cli.trainer.global_step == 30
    # the nested module got its own hparams back (LightningCLI had overwritten them with the outer config)
    assert dict(wrapped.module.hparams) == {"d_in": 16, "d_hidden": 32, "d_out": 8, "lr": 0.03, "weight_decay": 0.1}
    # protects: on held-out inputs of the kept capability, fc1's update acts only through the r-dim channel
    fora = next(c for c in cli.trainer.callbacks if isinstance(c, FORA))
    sub = fora.subspaces["module.fc1"]
    held_out = torch.randn(64, 4, generator=torch.Generator().manual_seed(9)) @ data.keep_basis.T
    outside = held_out @ sub.basis @ sub.basis.T if sub.complement else held_out - held_out @ sub.basis @ sub.basis.T
    assert torch.allclose(outside, torch.zeros_like(outside), atol=1e-5)  # held-out kept inputs lie in span(Q)
    fc1 = wrapped.module.fc1.weight.detach()
    w0 = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RecordW0").w0[
        "module.fc1"
    ]  # (imported as tests.test_cli)
    w0_x = w0 @ held_out.T
    delta_x = fc1 @ held_out.T - w0_x
    channel = torch.diagonal(sub.u.T @ (fc1 - w0) @ sub.v)  # diag(U^T (W - W0) V)
    torch.testing.assert_close(channel, sub.delta, rtol=0, atol=1e-5)  # FORA's running channel coordinate
    channel_x = sub.u @ (channel[:, None] * (sub.v.T @ held_out.T))
    leak = (delta_x - channel_x).norm() / w0_x.norm()
    assert leak < 1e-5
    # a checkpoint of this run reloads into the bare class (own hparams) and into the wrapper
    path = tmp_path / "wrapped.ckpt"
    cli.trainer.save_checkpoint(path)
    bare = Regressor.load_from_checkpoint(path)
    assert bare.hparams.lr == 0.03 and bare.hparams.d_hidden == 32
    torch.testing.assert_close(bare.fc1.weight, fc1)
    again = ForaModule.load_from_checkpoint(path)
    assert again.config.target_modules == ["fc1", "fc2"] and again.config.weight_rank == 2
    torch.testing.assert_close(again.module.fc2.weight, wrapped.module.fc2.weight)


def test_overrides_and_interpolation(capsys):
    cfg = print_config(
        [
            "fit",
            "--config",
            str(ROOT / "configs/wrap_existing.yaml"),
            "--model.init_args.config.energy",
            "0.9",
            "--model.init_args.module.init_args.d_in",
            "12",
        ],
        capsys,
    )
    assert cfg["model"]["init_args"]["config"]["energy"] == 0.9
    assert cfg["model"]["init_args"]["module"]["init_args"]["d_in"] == 12
    assert cfg["data"]["init_args"]["d_in"] == 12  # ${...} resolved after the command line: the override reaches it


def test_interpolation_follows_overrides_and_overlays_and_yields_to_its_own_key(capsys):
    qwen = str(ROOT / "configs/qwen3_translation_keep_math.yaml")
    cfg = print_config(["fit", "--config", qwen, "--model.init_args.module.init_args.model", "my/model"], capsys)
    assert cfg["data"]["init_args"]["tokenizer"] == "my/model"
    cfg = print_config(
        [
            "fit",
            "--config",
            qwen,
            "--model.init_args.module.init_args.model",
            "my/model",
            "--data.init_args.tokenizer",
            "my/tokenizer",
        ],
        capsys,
    )
    assert cfg["data"]["init_args"]["tokenizer"] == "my/tokenizer"
    demo = ["fit", "--config", str(ROOT / "configs/demo.yaml")]
    cfg = print_config(demo + ["--trainer.default_root_dir", "elsewhere"], capsys)
    assert cfg["model"]["init_args"]["module"]["init_args"]["save_dir"] == "elsewhere/tuned_model"
    # a later --config overlay (fsdp.yaml sets trainer keys only) keeps the interpolations resolvable
    cfg = print_config(
        [
            "fit",
            "--config",
            str(ROOT / "configs/wrap_existing.yaml"),
            "--config",
            str(ROOT / "configs/fsdp.yaml"),
            "--model.init_args.module.init_args.d_in",
            "12",
        ],
        capsys,
    )
    assert cfg["data"]["init_args"]["d_in"] == 12
    assert cfg["trainer"]["strategy"]["init_args"]["save_distributed_checkpoint"] is True


@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_paper_configs_parse_offline(name, capsys):
    cfg = print_config(["fit", "--config", str(ROOT / f"configs/{name}.yaml")], capsys)
    inner = cfg["model"]["init_args"]["module"]
    assert inner["class_path"] == "fora_lightning.CausalLMModule"
    assert inner["init_args"]["model"] == "Qwen/Qwen3-1.7B"
    data = cfg["data"]["init_args"]
    assert data["tokenizer"] == "Qwen/Qwen3-1.7B"
    assert {data["task"]["path"], data["preserve"]["path"]} <= {"Punchwe/COGS", "openai/gsm8k", "wmt/wmt14"}


def test_inspect_subcommand_is_dispatched(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(["inspect", "--help"])
    assert exit_info.value.code == 0
    assert "--subspaces" in capsys.readouterr().out


@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_paper_configs_checkpoint_for_resuming(name, capsys):
    cfg = print_config(["fit", "--config", str(ROOT / f"configs/{name}.yaml")], capsys)
    checkpoints = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 1 and checkpoints[0]["init_args"]["save_last"] is True
    assert cfg["trainer"]["enable_checkpointing"] is not False
