"""The comparison command end to end on a tiny Llama, 2 optimizer steps per method."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from experiments.compare import main
from experiments.methods import METHODS
from tests.tiny_lm import keep_rows, save_tokenizer, task_rows, tiny_llama_config, write_jsonl


@pytest.fixture(scope="module")
def setting_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    cfg = tiny_llama_config()
    model_dir = root / "model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(model_dir)
    save_tokenizer(model_dir)
    task = write_jsonl(root / "task.jsonl", task_rows(24))
    keep = write_jsonl(root / "keep.jsonl", keep_rows(40))
    config = {
        "setting": "tiny",
        "seed": 0,
        "output_dir": str(root / "out"),
        "model": {"model": str(model_dir), "lr": 1e-2},
        "data": {
            "tokenizer": str(model_dir),
            "task": {"path": task},
            "preserve": {"path": keep, "prompt_field": "question", "response_field": "answer"},
            "preserve_val_size": 8,
            "batch_size": 4,
            "max_length": 16,
        },
        "trainer": {"max_steps": 2},
        "target_modules": r"model\.model\.layers\.\d\.(self_attn\.[qv]_proj|mlp\.(up|down)_proj)",  # a regex, as users write
        "evaluation": {
            "preserved": {
                "path": keep,
                "name": "keep",
                "prompt_field": "question",
                "answer_field": "answer",
                "limit": 6,
                "max_new_tokens": 2,
            },
            "new_task": {"path": task, "name": "task", "limit": 6, "max_new_tokens": 2},
            "extra": {
                "keep_ppl": {
                    "path": keep,
                    "metric": "perplexity",
                    "prompt_field": "question",
                    "answer_field": "answer",
                    "limit": 6,
                }
            },
        },
        "methods": {
            "fora": {"energy": 0.9, "weight_rank": 2},
            "plain_ft": {},
            "lora": {"lora_rank": 2, "model": {"lr": 5e-2}},
            "l2sp": {"lambda_": 0.1},
            "ewc": {"lambda_": 0.1},
            "weight_projection": {"weight_rank": 2},
            "random": {"weight_rank": 2},
            "fora_lora": {"lora_rank": 2, "energy": 0.9, "weight_rank": 2},
            "peft_lora": {"lora_rank": 2, "model": {"lr": 5e-2}},
            "osf": {},
            "corda_kpm": {"lora_rank": 2},
        },
        "sweeps": {"l2sp": {"lambda_": [0.1, 10.0]}, "corda_kpm": {"lora_rank": [4]}},  # run with --sweep only
    }
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root / "out"


def test_compare_runs_every_method_and_writes_the_issue_shape(setting_file):
    path, out = setting_file
    assert main(["--config", str(path), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"setting", "preserved_metric", "new_task_metric", "higher_is_better", "methods"}
    assert results["higher_is_better"] == {"preserved": True, "new_task": True}
    assert set(results["methods"]) == set(METHODS)
    fields = {
        "preserved": float,
        "preserved_base": float,
        "new_task": float,
        "kl": float,
        "leakage": float,
        "heldout_loss_delta": float,
        "trainable_params": int,
        "wall_s": float,
        "k_mean": float,
    }
    for name, row in results["methods"].items():
        assert set(row) == set(fields), name
        for key, kind in fields.items():
            assert isinstance(row[key], kind) or (kind is float and isinstance(row[key], int)), (name, key)
    rows = results["methods"]
    assert len({r["preserved_base"] for r in rows.values()}) == 1  # one base model for all
    assert rows["plain_ft"]["kl"] > 0 and rows["plain_ft"]["leakage"] > 0
    assert rows["lora"]["trainable_params"] < rows["plain_ft"]["trainable_params"] == rows["fora"]["trainable_params"]
    assert rows["lora"]["k_mean"] == 0.0 and rows["fora"]["k_mean"] > 0
    details = json.loads((out / "details.json").read_text())
    k = details["methods"]["fora"]["k"]
    assert k and details["methods"]["weight_projection"]["k"] == k == details["methods"]["random"]["k"]
    assert details["methods"]["fora_lora"]["k"] == k  # same calibration, same energy
    assert "extra/keep_ppl" in details["methods"]["fora"] and details["base"]["extra/keep_ppl"] > 1
    # the PEFT peers: peft's own parameters counted, scored merged, OSF at FORA's k per layer
    assert (
        rows["peft_lora"]["trainable_params"]
        == rows["lora"]["trainable_params"]
        == rows["corda_kpm"]["trainable_params"]
    )
    assert 0 < rows["osf"]["trainable_params"] != rows["plain_ft"]["trainable_params"]
    assert details["methods"]["osf"]["k"] == {n: max(1, v) for n, v in k.items()}
    for peer in ("peft_lora", "osf", "corda_kpm"):
        assert rows[peer]["kl"] > 0 and rows[peer]["leakage"] > 0, peer
    assert rows["plain_ft"]["heldout_loss_delta"] != 0.0
    table = (out / "table.md").read_text()
    assert all(
        label in table
        for label in (
            "FORA-LoRA",
            "weight-space projection",
            "L2-SP",
            "EWC",
            "LoRA",
            "PEFT OSF",
            "PEFT CorDA-KPM",
            "Δ held-out loss",
        )
    )
    assert (out / "plot.png").stat().st_size > 1000


def test_compare_sweep_over_seeds_writes_points_with_spread_and_a_pareto_plot(setting_file):
    path, _ = setting_file
    out = path.parent / "sweep"
    argv = [
        "--config",
        str(path),
        "--methods",
        "l2sp,corda_kpm",
        "--sweep",
        "--seeds",
        "0",
        "1",
        "--output",
        str(out),
        "--no-progress",
        "--max-steps",
        "1",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    keys = [p["key"] for p in results["points"]]
    assert keys == ["l2sp", "l2sp[lambda_=10.0]", "corda_kpm", "corda_kpm[lora_rank=4]"]  # 0.1 is l2sp's own config
    for p in results["points"]:
        assert set(p["seeds"]) == {"0", "1"} and p["stats"]["new_task"]["n"] == 2
        values = [row["kl"] for row in p["seeds"].values()]
        assert p["stats"]["kl"]["min"] == min(values) and p["stats"]["kl"]["max"] == max(values)
    assert any(p["pareto"] for p in results["points"])
    by_key = {p["key"]: p for p in results["points"]}
    assert (
        by_key["corda_kpm[lora_rank=4]"]["stats"]["trainable_params"]["mean"]
        == 2 * by_key["corda_kpm"]["stats"]["trainable_params"]["mean"]
    )
    assert (out / "results.csv").read_text().count("\n") == 1 + len(keys)
    assert "± " in (out / "table.md").read_text() and (out / "pareto.png").stat().st_size > 1000


def test_compare_refuses_matched_k_without_fora(setting_file):
    path, _ = setting_file
    with pytest.raises(ValueError, match="include 'fora'"):
        main(["--config", str(path), "--methods", "plain_ft,weight_projection", "--no-progress"])


def test_preservation_metrics_logged_during_validation_match_direct_evaluation(setting_file):
    import lightning.pytorch as pl

    from experiments.preservation import PreservationMetrics, evaluate_preservation, model_target_names
    from fora_lightning.llm import CausalLMModule, TextDataModule

    config = yaml.safe_load(setting_file[0].read_text())
    dm = TextDataModule(**{**config["data"], "task_val_size": 4})
    module = CausalLMModule(**config["model"])
    callback = PreservationMetrics(target_modules=config["target_modules"])
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    direct = evaluate_preservation(
        callback.base,
        module.model,
        dm.val_dataloader()[dm.val_dataloader_names.index("preserve")],
        model_target_names(module, module.model, config["target_modules"]),
    )
    assert direct["kl"] > 0 and direct["leakage_mean"] > 0
    for key in ("kl", "ppl", "leakage_mean"):
        assert logged[f"val/preserve/{key}"].item() == pytest.approx(direct[key], rel=1e-4)


def test_an_interrupted_compare_keeps_the_runs_it_finished(setting_file, monkeypatch):
    import experiments.compare as compare_mod

    path, _ = setting_file
    out = path.parent / "interrupted"
    real, calls = compare_mod.run_method, []

    def crash_on_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_mod, "run_method", crash_on_third)
    argv = ["--config", str(path), "--methods", "l2sp", "--sweep", "--seeds", "0", "1", "--output", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--no-progress", "--max-steps", "1"])
    results = json.loads((out / "results.json").read_text())
    assert [p["key"] for p in results["points"]] == ["l2sp", "l2sp[lambda_=10.0]"]  # both points of seed 0
    assert all(set(p["seeds"]) == {"0"} and p["stats"]["new_task"]["n"] == 1 for p in results["points"])
    assert (out / "table.md").exists() and (out / "results.csv").read_text().count("\n") == 3


def test_resume_reuses_the_runs_of_the_same_setting_and_reruns_the_rest(setting_file, monkeypatch):
    import experiments.compare as compare_mod

    path, _ = setting_file
    out = path.parent / "resumed"
    real, calls = compare_mod.run_method, []

    def counting(*args, **kwargs):
        calls.append(args[-1] if isinstance(args[-1], str) else args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_mod, "run_method", counting)
    argv = ["--config", str(path), "--sweep", "--output", str(out), "--no-progress", "--max-steps", "1"]
    assert main([*argv, "--methods", "l2sp"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert calls == ["l2sp", "l2sp[lambda_=10.0]"]
    assert main([*argv, "--methods", "plain_ft,l2sp", "--resume"]) == 0  # only plain_ft is new
    assert calls[2:] == ["plain_ft"]
    again = {p["key"]: p for p in json.loads((out / "results.json").read_text())["points"]}
    for p in first["points"]:  # the reused rows are the first invocation's, number for number
        assert again[p["key"]]["seeds"] == p["seeds"]
    assert main([*argv, "--methods", "l2sp", "--resume", "--max-steps", "2"]) == 0  # another setting: run again
    assert calls[3:] == ["l2sp", "l2sp[lambda_=10.0]"]
    assert main([*argv, "--methods", "l2sp"]) == 0  # no --resume: a fresh log, everything runs
    assert calls[5:] == ["l2sp", "l2sp[lambda_=10.0]"]
