"""The offline demo: its shipped assets, the exact-match evaluator, and configs/demo.yaml end to end on 2 steps."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fora_lightning import FORA, ForaModule
from fora_lightning.llm.generation import evaluate_exact_match, exact_match, read_pairs
from fora_lightning.llm.report import ExactMatchReport

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def test_exact_match_hand_cases():
    preds = ["JUMP JUMP", "  LTURN   WALK ", "RUN", "LOOK LOOK"]
    refs = ["JUMP JUMP", "LTURN WALK", "RUN RUN", "LOOK"]
    assert exact_match(preds, refs) == 0.5  # whitespace is normalised; a missing or extra word fails
    assert exact_match(["walk"], ["WALK"]) == 0.0  # case matters
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_read_pairs_limit_and_errors(tmp_path):
    prompts, answers = read_pairs(DEMO / "scan" / "test.jsonl", limit=3)
    assert len(prompts) == len(answers) == 3 and prompts[0].startswith("command : ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(KeyError, match="no field 'response'"):
        read_pairs(bad)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "missing.jsonl")


def test_greedy_evaluator_on_the_demo_model():
    """The shipped model translates these four prompts; one reference is corrupted and must not match."""
    model = AutoModelForCausalLM.from_pretrained(DEMO / "model")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    tokenizer.padding_side = "right"
    prompts, answers = read_pairs(DEMO / "translation" / "test.jsonl", limit=4)
    wrong = answers[3].split()
    answers[3] = " ".join(wrong[1:] + wrong[:1])  # same words, wrong order
    result = evaluate_exact_match(model, tokenizer, prompts, answers, batch_size=3)
    assert result.predictions[:3] == answers[:3]
    assert result.accuracy == 0.75 and result.n == 4
    assert tokenizer.padding_side == "right"  # given back as it was


def test_heldout_translation_prompts_do_not_share_prefixes_with_calibration():
    def first_two_words(path: Path) -> set[tuple[str, ...]]:
        prompts, _ = read_pairs(path)
        return {tuple(p.split()[2:4]) for p in prompts}  # after "translate :"

    calibration = first_two_words(DEMO / "translation" / "calibration.jsonl")
    for split in ("validation", "test"):
        assert not calibration & first_two_words(DEMO / "translation" / f"{split}.jsonl")


def test_demo_config_end_to_end(tmp_path, monkeypatch):
    """configs/demo.yaml through cli.py on a 2-step budget: the report exists with the expected keys."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    (report_cfg,) = config["trainer"]["callbacks"]
    report_cfg["init_args"]["limit"] = 8
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")  # also moves save_dir (interpolated from it)
    small = tmp_path / "demo_small.yaml"
    small.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(ROOT)  # the config's asset paths are relative to the repository root
    spec = importlib.util.spec_from_file_location("fora_cli", ROOT / "cli.py")
    cli_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_module)
    cli = cli_module.main(
        [
            "fit",
            "--config",
            str(small),
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.init_args.config.progress",
            "false",
        ]
    )
    assert isinstance(cli.model, ForaModule) and cli.trainer.global_step == 2
    assert any(isinstance(c, FORA) for c in cli.trainer.callbacks)
    report = next(c for c in cli.trainer.callbacks if isinstance(c, ExactMatchReport))
    out = Path(cli.trainer.log_dir)
    result = json.loads((out / "report.json").read_text())
    assert result == report.result
    assert result["method"] == "fora" and result["metric"] == "exact_match" and result["global_step"] == 2
    for role, name in (("preserved", "translation"), ("new_task", "scan")):
        entry = result[role]
        assert set(entry) == {"name", "path", "n", "before", "after"}
        assert entry["name"] == name and entry["n"] == 8
        assert 0.0 <= entry["before"] <= 1.0 and 0.0 <= entry["after"] <= 1.0
    assert result["preserved"]["before"] == 1.0  # the shipped model translates these 8 prompts
    table = (out / "report.md").read_text()
    assert "| kept capability | translation | 8 |" in table and "| new task | scan | 8 |" in table
    assert (tmp_path / "run" / "tuned_model" / "model.safetensors").is_file()
