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


def _reference_readings(callback, module, base, name: str) -> dict[str, float]:
    """Dense float64 readings on the probe's stored rows X (core/leakage.py): with X_Q = X Q Q^T, diff = f(X_Q) - f0(X_Q),
    leakage = ||diff - (X_Q V) diag(delta_hat) U^T|| / ||f0(X_Q)||, span = ||diff|| / ||f0(X_Q)||, heldout on X itself."""
    sub = callback.subspaces[name]
    rel = name.removeprefix("model.")
    ref = base.get_submodule(rel)
    w0 = ref.weight.detach()
    b0 = ref.bias.detach() if ref.bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    tuned = module.model.get_submodule(rel)
    layer = tuned.base_layer if hasattr(tuned, "lora_delta") else tuned
    w = layer.weight.detach().double() + (tuned.delta_weight().detach() if hasattr(tuned, "lora_delta") else 0)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(b0)
    x = callback.protection.monitor.probe.held[name].x.double()
    basis = sub.basis.double()
    qqt = basis @ basis.T if not sub.complement else torch.eye(x.shape[1], dtype=torch.float64) - basis @ basis.T
    xq = x @ qqt
    y0, diff = xq @ w0.T + b0, xq @ (w - w0).T + (b - b0)
    u, v = sub.u.double(), sub.v.double()
    coords, proj = diff @ u, xq @ v
    delta = (coords * proj).sum(0) / (proj * proj).sum(0)
    raw0 = x @ w0.T + b0
    return {
        "leakage": float((diff - (proj * delta) @ u.T).norm() / y0.norm()),
        "span": float(diff.norm() / y0.norm()),
        "heldout": float((x @ (w - w0).T + (b - b0)).norm() / raw0.norm()),
        "bound": float(0.05 * (xq @ w0.T).norm() / y0.norm()),
    }


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

    monitor = callback.protection.monitor
    probe = monitor.probe
    assert monitor.held_out and monitor.probe_source.startswith("datamodule.preserve_val_dataloader()")
    x = next(iter(probe.held.values())).x
    assert 0 < x.shape[0] <= 64
    readings = probe.read()
    for name in callback.subspaces:
        ref, got, lim = _reference_readings(callback, module, base, name), readings[name], monitor.limits[name]
        assert got.leakage < 1e-5 and ref["leakage"] < 1e-5  # in S: nothing outside the channel, up to rounding
        assert got.span == pytest.approx(ref["span"], rel=1e-4) and got.span > 1e-4  # the channel moved
        assert got.heldout == pytest.approx(ref["heldout"], rel=1e-4)
        assert lim.tolerance == 1e-5 and lim.span == pytest.approx(ref["bound"] + 1e-5, rel=1e-5)
        assert got.span <= lim.span  # the certified bound holds
    measured = probe.leakage()
    leak_d = float(rows[-1]["fora/leakage_max"])
    assert leak_d == pytest.approx(max(measured.values()), rel=1e-5)
    spans = [float(r["fora/span_change_max"]) for r in rows]
    assert spans[-1] == pytest.approx(max(r.span for r in readings.values()), rel=1e-5)
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
        assert r["leakage"] == pytest.approx(measured[r["layer"]], rel=1e-3, abs=1e-8)
        assert r["span_change"] == pytest.approx(readings[r["layer"]].span, rel=1e-5)
        assert r["span_bound"] == pytest.approx(monitor.limits[r["layer"]].span, rel=1e-9)
        assert "channel_bound" in r and "leakage_heldout" in r and "heldout_tolerance" in r
    s = report["summary"]
    assert s["verdict"] == "ok" and s["sentinel_checks"] == 4 and "violation" not in s  # steps 2, 4, 6 and the end
    assert s["probe_inputs"] == monitor.probe_source and s["probe_bytes"] == probe.nbytes() > 0
    worst = s["worst_span_change"]
    assert worst["bound"] == pytest.approx(monitor.limits[worst["layer"]].span) and worst["value"] <= worst["bound"]
    assert s["worst_leakage"]["bound"] == 1e-5 and s["worst_leakage"]["value"] < 1e-5
    assert "leakage sentinel: ok after 4 checks" in md and "worst span_change" in md
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
    assert s["kl"] == pytest.approx(float(kl.compute()), rel=1e-3, abs=1e-6)
    assert s["ppl"] == pytest.approx(float(ppl.compute()), rel=1e-4)
    assert s["ppl_base"] == pytest.approx(float(ppl_base.compute()), rel=1e-4)
    assert s["kl"] > 0 and s["report_batches"] == 2
    assert (
        "| layer | k | r | energy | channel_bound | leakage | span_change | span_bound |" in md
        and next(iter(callback.subspaces)) in md
    )


def test_probe_restored_from_checkpoint_and_no_probe_without_inputs(data, tmp_path):
    fora = FORA(target_modules=TARGETS, rank=3)
    _fit(data, tmp_path, fora, steps=2)
    state = fora.state_dict()
    assert set(state["probe"]["layers"]) == set(fora.subspaces)
    again = FORA(target_modules=TARGETS, rank=3)
    again.load_state_dict(state)
    assert again.protection.monitor._restored is not None
    for name, entry in state["probe"]["layers"].items():
        held = fora.protection.monitor.probe.held[name]
        for key in ("x", "xq", "y0", "yq0", "z0"):
            torch.testing.assert_close(entry[key], getattr(held, key))


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
