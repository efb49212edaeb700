"""CausalLMModule on a tiny inline Llama config: response-only loss, schedule, FORA fit, save/reload."""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from tiny_lm import keep_rows, save_tokenizer, task_rows, tiny_llama_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from fora_lightning import FORA, ForaLoRA, ForaModule
from fora_lightning.llm import CausalLMModule, TextDataModule, TextSource
from fora_lightning.llm.causal_lm import warmup_cosine
from fora_lightning.lora import inject_fora_lora

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture
def data(tmp_path) -> TextDataModule:
    return TextDataModule(
        tokenizer=save_tokenizer(tmp_path / "tok"),
        task=TextSource(write_jsonl(tmp_path / "task.jsonl", task_rows(24))),
        preserve=TextSource(
            write_jsonl(tmp_path / "keep.jsonl", keep_rows(20)), prompt_field="question", response_field="answer"
        ),
        task_val_size=4,
        preserve_val_size=4,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )


def test_loss_is_response_only_and_matches_hf(data):
    torch.manual_seed(0)
    module = CausalLMModule(config=tiny_llama_config())
    data.setup()
    batch = next(iter(data.val_dataloader()[0]))
    nll, count = module._nll(batch)
    assert count == (batch["labels"][:, 1:] != -100).sum() > 0
    hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(nll / count, hf)
    assert ((batch["labels"] == -100) & (batch["attention_mask"] == 1)).any(), "prompt tokens are masked"


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1)


@pytest.mark.parametrize("wrapped", [False, True], ids=["callback", "ForaModule"])
def test_fora_fit_logs_perplexity_per_loader_and_saves_pretrained(data, tmp_path, wrapped):
    torch.manual_seed(0)
    save_dir = tmp_path / "tuned"
    module = CausalLMModule(config=tiny_llama_config(), tokenizer=data.tokenizer_path, lr=1e-2, save_dir=str(save_dir))
    fora_args = dict(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], energy=0.9, weight_rank=2, progress=False
    )
    base = {n: m.weight.detach().clone() for n, m in module.named_modules() if n.endswith(("q_proj", "up_proj"))}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        val_check_interval=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[] if wrapped else [FORA(**fora_args)],
    )
    trainer.fit(ForaModule(module, **fora_args) if wrapped else module, datamodule=data)
    fora = next(c for c in trainer.callbacks if isinstance(c, FORA))
    metrics = trainer.callback_metrics
    for name in ("task", "preserve"):
        assert torch.isfinite(metrics[f"val/{name}_ppl"])
        torch.testing.assert_close(metrics[f"val/{name}_ppl"], metrics[f"val/{name}_loss"].exp())
    # FORA really acted on the LM: the update of a protected layer leaves the calibration subspace's inputs alone
    name = "model.model.layers.0.mlp.up_proj"
    sub = fora.subspaces[f"module.{name}" if wrapped else name]
    delta = module.get_submodule(name).weight.detach() - base[name]
    assert delta.norm() > 0
    leak = (delta - sub.u @ torch.diag(torch.diagonal(sub.u.T @ delta @ sub.v)) @ sub.v.T) @ sub.basis
    assert leak.norm() / delta.norm() < 1e-4
    # saved with save_pretrained at fit end; reloads with from_pretrained and gives the same logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir)
    tok = AutoTokenizer.from_pretrained(save_dir)
    ids = torch.tensor([tok("add a b =")["input_ids"]])
    module.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    # and CausalLMModule itself loads the local directory, tokenizer included
    again = CausalLMModule(model=str(save_dir))
    assert again.tokenizer("add a b =")["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(again.model(input_ids=ids).logits, module.model(input_ids=ids).logits)


@pytest.mark.parametrize("wrapped", [False, True], ids=["callback", "ForaModule"])
def test_fora_lora_fit_saves_the_merged_model_and_the_adapter(data, tmp_path, wrapped):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    save_dir = tmp_path / "tuned"
    module = CausalLMModule(config=tiny_llama_config(), tokenizer=data.tokenizer_path, lr=1e-2, save_dir=str(save_dir))
    base = copy.deepcopy(module.model).eval()
    lora_args = dict(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        energy=0.9,
        weight_rank=2,
        lora_rank=4,
        progress=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if wrapped else [ForaLoRA(**lora_args)],
    )
    trainer.fit(ForaModule(module, **lora_args) if wrapped else module, datamodule=data)
    assert (
        type(module.model.model.layers[0].self_attn.q_proj).__name__ == "ForaLoraLinear"
    )  # the live model keeps its layers
    ids = torch.tensor([AutoTokenizer.from_pretrained(save_dir)("add a b = translate one a :")["input_ids"]])
    module.eval()
    with torch.no_grad():
        tuned = module.model(input_ids=ids).logits
        assert (tuned - base(input_ids=ids).logits).abs().max() > 1e-3  # the LoRA update really trained
        # a plain Hugging Face checkpoint: every weight present (none re-initialised), the update merged exactly
        reloaded, info = AutoModelForCausalLM.from_pretrained(save_dir, output_loading_info=True)
        assert not any(info.values()), info
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, tuned, atol=1e-5, rtol=0)
        # and the adapter, applied by PEFT to the base model, gives the same model
        adapted = peft.PeftModel.from_pretrained(base, str(save_dir / "adapter")).eval()
        torch.testing.assert_close(adapted(input_ids=ids).logits, tuned, atol=1e-5, rtol=0)


def test_fora_lora_save_dir_is_refused_before_training_under_fsdp1_only():
    """FSDP2 (ModelParallelStrategy) gathers the FORA-LoRA model for its export (tests/distributed/test_llm_stack.py)."""
    module = CausalLMModule(config=tiny_llama_config(), save_dir="unused")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    module.on_fit_start()  # no FORA-LoRA layers: the gathered-state export works
    inject_fora_lora(module.model, ["q_proj"], lora_rank=2)
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    module.on_fit_start()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(NotImplementedError, match="FORA-LoRA layers under FSDPStrategy"):
        module.on_fit_start()


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one of model"):
        CausalLMModule()
    with pytest.raises(ValueError, match="model_type"):
        CausalLMModule(config={"hidden_size": 8})
