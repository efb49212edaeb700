"""Old import paths: the library's parts of ``fora_lightning.eval`` keep working; the harness names its new place."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

import fora_lightning.baselines
import fora_lightning.llm.generation
import fora_lightning.llm.report
import fora_lightning.metrics
from fora_lightning._moved import MOVED_OUT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
KEPT = {
    "fora_lightning.eval.baselines.TrainTargetsOnly": fora_lightning.baselines.TrainTargetsOnly,
    "fora_lightning.eval.l2sp.L2SP": fora_lightning.baselines.L2SP,
    "fora_lightning.eval.ewc.EWC": fora_lightning.baselines.EWC,
    "fora_lightning.eval.metrics.LayerLeakage": fora_lightning.metrics.LayerLeakage,
    "fora_lightning.eval.metrics.leakage": fora_lightning.metrics.leakage,
    "fora_lightning.eval.generation.evaluate_exact_match": fora_lightning.llm.generation.evaluate_exact_match,
    "fora_lightning.eval.report.ExactMatchReport": fora_lightning.llm.report.ExactMatchReport,
    "fora_lightning.eval.L2SP": fora_lightning.baselines.L2SP,
    "fora_lightning.eval.ExactMatch": fora_lightning.metrics.ExactMatch,
}


@pytest.mark.parametrize("path", sorted(KEPT))
def test_library_paths_of_the_old_eval_package_keep_working(path):
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name) is KEPT[path]


@pytest.mark.parametrize("old", sorted(MOVED_OUT))
def test_a_module_that_left_the_package_names_its_new_place(old):
    new = MOVED_OUT[old]
    with pytest.raises(ModuleNotFoundError, match=f"FORA: {old} moved to {new}"):
        importlib.import_module(old)
    package, _, name = old.rpartition(".")
    with pytest.raises(AttributeError, match=f"FORA: {old} moved to {new}"):  # how jsonargparse reaches a class_path
        getattr(importlib.import_module(package), name)
    assert importlib.util.find_spec(new) is not None  # and the new place exists (from the repository root)


def test_preservation_names_under_the_old_eval_package_name_their_new_place():
    import fora_lightning.eval

    with pytest.raises(AttributeError, match="experiments.preservation.PreservationMetrics"):
        fora_lightning.eval.PreservationMetrics  # noqa: B018


def load_cli():
    spec = importlib.util.spec_from_file_location("fora_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_class_paths_in_yaml(tmp_path, capsys):
    """README-era YAML: the old baseline paths parse; the toy module's old path fails naming experiments.examples."""
    overlay = tmp_path / "old_callbacks.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": "fora_lightning.eval.baselines.TrainTargetsOnly"},
                        {"class_path": "fora_lightning.eval.l2sp.L2SP", "init_args": {"lambda_": 0.1}},
                    ]
                }
            }
        )
    )
    wrap = str(ROOT / "configs/wrap_existing.yaml")
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(["fit", "--config", wrap, "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        "fora_lightning.eval.baselines.TrainTargetsOnly",
        "fora_lightning.eval.l2sp.L2SP",
    ]
    old = tmp_path / "old_examples.yaml"
    old.write_text(
        (ROOT / "configs/wrap_existing.yaml").read_text().replace("experiments.examples", "fora_lightning.examples")
    )
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(["fit", "--config", str(old), "--print_config"])
    assert exit_info.value.code == 2
    assert "FORA: fora_lightning.examples moved to experiments.examples" in capsys.readouterr().err
