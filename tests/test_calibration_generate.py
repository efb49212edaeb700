"""``calibration_generate = N``: each calibration prompt is extended by the base model's own greedy continuation
before the covariances are collected; checked against generating the same text by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer
from torch.utils.data import DataLoader

from fora_lightning import FORA, ForaConfig
from fora_lightning.llm import CausalLMModule
from fora_lightning.llm.encoding import PadCollator
from fora_lightning.llm.generation import generate_greedy

DEMO = "assets/demo/model"
PROMPTS = ["translate : tasu rili niba =", "translate : rili =", "translate : niba tasu rili tasu ="]


def _prompt_batch(module: CausalLMModule, eos: bool) -> dict[str, torch.Tensor]:
    tok = module.tokenizer
    rows = [{"input_ids": tok(p)["input_ids"] + ([tok.eos_token_id] if eos else [])} for p in PROMPTS]
    return PadCollator(tok.pad_token_id, labels=False)(rows)


@pytest.mark.parametrize("eos", [False, True], ids=["prompt", "prompt+eos"])
def test_generate_continuations_appends_the_greedy_answer(eos: bool):
    module = CausalLMModule(model=DEMO)
    batch = _prompt_batch(module, eos)
    out = module.generate_continuations(batch, max_new_tokens=12)
    answers = generate_greedy(module.model, module.tokenizer, PROMPTS, max_new_tokens=12)
    tok = module.tokenizer
    for ids, mask, prompt, answer in zip(out["input_ids"], out["attention_mask"], PROMPTS, answers, strict=True):
        n = int(mask.sum())
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)  # right-padded
        assert int(ids[n - 1]) == tok.eos_token_id  # the model's own EOS ends each row, once
        assert int((ids[:n] == tok.eos_token_id).sum()) == 1
        assert tok.decode(ids[:n], skip_special_tokens=True).split() == (prompt + " " + answer).split()
    assert out["input_ids"].shape[1] > batch["input_ids"].shape[1]


def _spectra(calibration, generate: int) -> dict[str, torch.Tensor]:
    module = CausalLMModule(model=DEMO, lr=0.0)
    cb = FORA(
        calibration=calibration, target_modules=["q_proj", "up_proj"], calibration_generate=generate, progress=False
    )
    tiny_trainer(callbacks=[cb], max_steps=1).fit(
        module, DataLoader([{**b, "labels": b["input_ids"]} for b in calibration], batch_size=None)
    )
    return {n: s.spectrum for n, s in cb.subspaces.items()}


def test_fora_calibrates_on_the_extended_text():
    module = CausalLMModule(model=DEMO)
    prompts = [_prompt_batch(module, eos=True)]
    by_hand = [module.generate_continuations(prompts[0], 12)]
    generated, manual, prompt_only = _spectra(prompts, 12), _spectra(by_hand, 0), _spectra(prompts, 0)
    for name in generated:
        torch.testing.assert_close(generated[name], manual[name], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(generated[name], prompt_only[name], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_calibration_generate_fails(bad):
    with pytest.raises(ValueError, match="calibration_generate"):
        ForaConfig(calibration_generate=bad)
