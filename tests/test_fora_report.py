"""Protection in the logger: the leakage probe every log_every_n_steps and fora_report.{json,md} at the end of fit."""

from __future__ import annotations

import copy
import csv
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny_lm import keep_rows, save_tokenizer, task_rows, tiny_llama_config, write_jsonl

from fora_lightning import FORA, ForaLoRA
from fora_lightning.llm import CausalLMModule, TextDataModule, TextSource
from fora_lightning.metrics import CausalPerplexity, TokenKL
from fora_lightning.metrics import leakage as relative_leakage

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
TARGETS = ["q_proj", "up_proj", "down_proj"]


@pytest.fixture
def data(tmp_path) -> TextDataModule:
    return TextDataModule(
        tokenizer=save_tokenizer(tmp_path / "tok"),
        task=TextSource(write_jsonl(tmp_path / "task.jsonl", task_rows(24))),
        preserve=TextSource(
            write_jsonl(tmp_path / "keep.jsonl", keep_rows(24)), prompt_field="question", response_field="answer"
        ),
        preserve_val_size=8,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )


def _fit(data, tmp_path, callback, steps: int = 6):
    torch.manual_seed(0)
    module = CausalLMModule(config=tiny_llama_config(), lr=3e-2)
    base = copy.deepcopy(module.model).double().eval()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module, base


def _metrics(trainer) -> list[dict[str, str]]:
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _reference_leakage(callback, module, base, name: str) -> float:
    """float64 dense reference on the probe's stored inputs: ||(D - U diag(U^T D V) V^T) X|| / ||W0 X||."""
    sub = callback.subspaces[name]
    rel = name.removeprefix("model.")
    w0 = base.get_submodule(rel).weight.detach()
    tuned = module.model.get_submodule(rel)
    w = (
        (tuned.base_layer.weight.double() + tuned.delta_weight())
        if hasattr(tuned, "lora_delta")
        else tuned.weight.double()
    )
    d = w.detach() - w0
    u, v = sub.u.double(), sub.v.double()
    d = d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
    return relative_leakage(d, w0, callback.protection.monitor.probe.held[name].x)


@pytest.mark.parametrize("kind", ["fora", "fora_lora"])
def test_probe_logged_every_n_steps_matches_dense_reference_and_report_written(data, tmp_path, kind):
    callback = (
        FORA(target_modules=TARGETS, rank=3)
        if kind == "fora"
        else ForaLoRA(target_modules=TARGETS, rank=3, lora_rank=4)
    )
    trainer, module, base = _fit(data, tmp_path, callback)
    rows = [r for r in _metrics(trainer) if r.get("fora/leakage_max")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    per_layer = [r for r in _metrics(trainer) if r.get(f"fora/leakage/{next(iter(callback.subspaces))}")]
    assert [int(r["step"]) for r in per_layer] == []  # every 10 x log_every_n_steps = 20 steps: none in 6

    probe = callback.protection.monitor.probe
    assert callback.protection.monitor.held_out
    x = next(iter(probe.held.values())).x
    assert 0 < x.shape[0] <= 64
    measured = probe.leakage()
    for name in callback.subspaces:
        ref = _reference_leakage(callback, module, base, name)
        assert measured[name] == pytest.approx(ref, rel=1e-4, abs=1e-7)
    leak_d = float(rows[-1]["fora/leakage_max"])
    assert leak_d == pytest.approx(max(measured.values()), rel=1e-5)
    # the update did move the weights: the mean leakage is not trivially zero everywhere
    moved = max(
        float(
            (
                module.model.get_submodule(n.removeprefix("model.")).weight
                if kind == "fora"
                else module.model.get_submodule(n.removeprefix("model.")).lora_B
            )
            .detach()
            .abs()
            .max()
        )
        for n in callback.subspaces
    )
    assert moved > 0

    report = json.loads((tmp_path / "run" / "version_0" / "fora_report.json").read_text())
    md = (tmp_path / "run" / "version_0" / "fora_report.md").read_text()
    assert [r["layer"] for r in report["layers"]] == list(callback.subspaces)
    for r in report["layers"]:
        sub = callback.subspaces[r["layer"]]
        assert (r["k"], r["r"]) == (sub.k, sub.r)
        assert r["leakage"] == pytest.approx(measured[r["layer"]], rel=1e-6)
        assert "channel_bound" in r
    # KL(base || tuned) and perplexity on the held-out preserved batches, against the float64 base copy
    kl, ppl, ppl_base = TokenKL(), CausalPerplexity(), CausalPerplexity()
    module.model.eval()
    with torch.no_grad():
        for batch in data.preserve_val_dataloader():
            b = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kl.update(b, t, batch["attention_mask"])
            ppl.update(t, batch["input_ids"], batch["attention_mask"], batch["labels"])
            ppl_base.update(b, batch["input_ids"], batch["attention_mask"], batch["labels"])
    s = report["summary"]
    assert s["kl"] == pytest.approx(float(kl.compute()), rel=1e-3, abs=1e-6)
    assert s["ppl"] == pytest.approx(float(ppl.compute()), rel=1e-4)
    assert s["ppl_base"] == pytest.approx(float(ppl_base.compute()), rel=1e-4)
    assert s["kl"] > 0 and s["report_batches"] == 2
    assert "| layer | k | r | energy | channel_bound | leakage |" in md and next(iter(callback.subspaces)) in md


def test_probe_restored_from_checkpoint_and_no_probe_without_inputs(data, tmp_path):
    fora = FORA(target_modules=TARGETS, rank=3)
    _fit(data, tmp_path, fora, steps=2)
    state = fora.state_dict()
    assert set(state["probe"]) == set(fora.subspaces)
    again = FORA(target_modules=TARGETS, rank=3)
    again.load_state_dict(state)
    assert again.protection.monitor._restored is not None
    for name, entry in state["probe"].items():
        torch.testing.assert_close(entry["y0"], fora.protection.monitor.probe.held[name].y0)


def test_a_probe_loader_given_to_the_callback_logs_leakage_every_n_steps(tmp_path, mlp):
    """Without a TextDataModule: ``FORA(probe=held_out)`` logs fora/leakage_* (held-out span inputs: ~0 leak)."""
    import csv

    from conftest import calibration_loader, span_inputs, task_loader, tiny_trainer
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    held_out = DataLoader(span_inputs(64, seed=11), batch_size=64)
    fora = FORA(
        calibration=calibration_loader(), probe=held_out, target_modules=["fc1", "fc2"], weight_rank=2, progress=False
    )
    logger = CSVLogger(tmp_path, name="probe")
    tiny_trainer(max_steps=50, logger=logger, log_every_n_steps=5, callbacks=[fora]).fit(mlp, task_loader())
    logger.finalize("success")
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    logged = [int(r["step"]) for r in rows if r.get("fora/leakage_max")]
    assert logged == list(range(5, 55, 5))
    per_layer = [float(r["fora/leakage/fc1"]) for r in rows if r.get("fora/leakage/fc1")]
    assert len(per_layer) == 1 and per_layer[0] < 1e-5  # fc1 reads span(Q) only: exact outside the channel
