"""The LLM stack on 2 real gloo processes: CausalLMModule + TextDataModule + FORA / FORA-LoRA under DDP and FSDP2.

One launch trains each (strategy, method) pair 4 steps, checkpoints (a sharded DCP directory under FSDP2), resumes
to 6 steps and exports at the end of fit (``save_dir``); a single process does the same on the same global batches.
The exports, reloaded with ``from_pretrained`` (and the FORA-LoRA adapter with PEFT on the base model), must equal
the single-process ones: every weight, and the logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.distributed import _llm_worker as W
from tests.distributed.harness import launch
from tests.tiny_lm import keep_rows, save_tokenizer, task_rows, write_jsonl

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
STEPS, RESUMED = 4, 6  # 16 rows at global batch 4: one epoch, then the resumed fit starts a fresh one
PAIRS = [(s, m) for s in ("ddp", "fsdp2") for m in ("fora", "lora")]
PROMPT = "add a b = c translate one a : a"


def _scenario(root: Path, files: dict[str, str], strategy: str, method: str) -> dict[str, Any]:
    name = f"{strategy}_{method}"
    ckpt = root / (f"{name}.ckpt" if strategy != "fsdp2" else f"{name}-ckpt")
    return {
        **files,
        "name": name,
        "strategy": strategy,
        "method": method,
        "root": str(root),
        "steps": STEPS,
        "resume_steps": RESUMED,
        "ckpt": str(ckpt),
        "save_dir": str(root / f"{name}-tuned"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("llm-data")
    return {
        "tokenizer": save_tokenizer(tmp / "tok"),
        "task": write_jsonl(tmp / "task.jsonl", task_rows(16)),
        "keep": write_jsonl(tmp / "keep.jsonl", keep_rows(20)),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, files: dict[str, str]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("llm-dist")
    return launch(
        {"world": 2, "scenarios": [_scenario(tmp, files, s, m) for s, m in PAIRS]}, tmp, timeout=240, worker=W.__file__
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, files: dict[str, str]) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("llm-single")
    return {m: W.run({"world": 1, **_scenario(tmp, files, "single", m)}) for m in ("fora", "lora")}


def _result(runs: dict[str, Any], name: str) -> dict[str, Any]:
    r = runs[name]
    if "error" in r:
        pytest.fail(f"scenario {name} raised on rank 0:\n{r['error']}")
    assert r["global_step"] == RESUMED
    return r


def _reload(directory: str) -> AutoModelForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), f"{directory}: {info}"  # every weight present, none re-initialised
    return model.eval()


def _ids(directory: str) -> torch.Tensor:
    return torch.tensor([AutoTokenizer.from_pretrained(directory)(PROMPT)["input_ids"]])


@pytest.mark.parametrize(("strategy", "method"), PAIRS)
def test_exported_model_equals_single_process(runs, reference, strategy, method):
    got_dir, want_dir = _result(runs, f"{strategy}_{method}")["save_dir"], reference[method]["save_dir"]
    got, want, base = _reload(got_dir), _reload(want_dir), W.make_module(None, want_dir).model.eval()
    trained = max((want.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert trained > 1e-3, "the reference did not train"
    g = got.state_dict()
    for k, v in want.state_dict().items():
        torch.testing.assert_close(g[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{strategy}/{method} {k}: {m}")
    ids = _ids(got_dir)
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_exported_peft_adapter_equals_the_merged_model_and_single_process(runs, reference, strategy):
    peft = pytest.importorskip("peft")
    got_dir, want_dir = _result(runs, f"{strategy}_lora")["save_dir"], reference["lora"]["save_dir"]
    ids = _ids(got_dir)
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(
            W.make_module(None, got_dir).model, str(Path(got_dir) / "adapter")
        ).eval()
        single = peft.PeftModel.from_pretrained(
            W.make_module(None, want_dir).model, str(Path(want_dir) / "adapter")
        ).eval()
        merged = _reload(got_dir)(input_ids=ids).logits
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapted(input_ids=ids).logits, single(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
