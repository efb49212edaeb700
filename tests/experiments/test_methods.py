"""Method names: every compare method's Callback is named back to it, and ExactMatchReport labels runs by it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch import Callback

from experiments.methods import LABELS, METHODS, build_callback, method_of, trainer_method
from fora_lightning import FORA, ForaLoRA
from fora_lightning.llm.generation import ExactMatchResult
from fora_lightning.llm.report import ExactMatchReport


@pytest.mark.parametrize("name", METHODS)
def test_each_method_callback_is_named_back_to_its_method(name):
    callback = build_callback(name, {}, ["fc1"], {"fc1": 2})
    assert method_of(callback) == name


def test_all_methods_have_distinct_labels_and_plain_callbacks_are_no_method():
    assert sorted(LABELS) == sorted(METHODS) and len(set(LABELS.values())) == len(METHODS)
    assert method_of(Callback()) is None
    assert method_of(ForaLoRA(weight_rank=2, source="none")) == "fora_lora"  # a channel kept: not plain LoRA
    assert trainer_method([Callback(), FORA(source="weights")]) == "weight_projection"
    assert trainer_method([Callback()]) == "plain_ft"


@pytest.mark.parametrize("name", ["ewc", "random", "fora_lora"])
def test_exact_match_report_labels_the_run_by_its_method(name, monkeypatch):
    report = ExactMatchReport(preserved="keep.jsonl", new_task="task.jsonl")
    monkeypatch.setattr(
        report, "_evaluate", lambda *_: {r: ExactMatchResult(0.5, 4) for r in ("preserved", "new_task")}
    )
    report.before = {r: ExactMatchResult(0.25, 4) for r in ("preserved", "new_task")}
    trainer = SimpleNamespace(
        callbacks=[report, build_callback(name, {}, ["fc1"], {"fc1": 2})],
        global_step=3,
        logger=None,
        is_global_zero=False,
    )
    report.on_fit_end(trainer, None)
    assert report.result["method"] == name
    assert report.result["preserved"]["before"] == 0.25 and report.result["preserved"]["after"] == 0.5
