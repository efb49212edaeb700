"""Calibration sufficiency (issue 25): the hold-out slice, the held-out energy share against a dense float64
reference, the warning on narrow calibration data, and calibration_samples (fixed and 'auto') offline."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import MLP, calibration_loader, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from fora_lightning import FORA, ForaConfig
from fora_lightning.calibration import holdout_batch
from fora_lightning.core.covariance import Covariances, collect_covariances
from fora_lightning.core.subspace import SubspaceConfig, spectrum
from fora_lightning.core.sufficiency import RATIO_LINE, held_out_shares, sufficiency, sufficiency_warning
from fora_lightning.llm import CausalLMModule
from fora_lightning.llm.encoding import PadCollator

DEMO = "assets/demo/model"


def test_holdout_rule_every_nth_batch_from_the_first():
    assert [i for i in range(20) if holdout_batch(i, 8)] == [0, 8, 16]
    assert holdout_batch(0, 8) and not any(holdout_batch(i, 0) for i in range(10))


def _dense_share(x_in: torch.Tensor, x_out: torch.Tensor, energy: float, rank: int | None) -> tuple[float, int]:
    """The held-out share from the raw rows, float64: eigh of X_in^T X_in / n, k by the energy rule or rank."""
    c_in = x_in.T @ x_in / x_in.shape[0]
    evals, evecs = torch.linalg.eigh(c_in)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if rank is None:
        frac = torch.cumsum(evals, 0) / evals.sum()
        k = int((frac < energy - 1e-12).sum()) + 1
    else:
        k = rank
    q = evecs[:, :k]
    return float((x_out @ q).square().sum() / x_out.square().sum()), k


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(2, 12),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    energy=st.sampled_from([0.5, 0.9, 0.99]),
    fixed=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_held_out_share_matches_dense_float64(d, n_in, n_out, energy, fixed, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=gen, dtype=torch.float64) * 3
    x_in = torch.randn(n_in, d, generator=gen, dtype=torch.float64) * scale
    x_out = torch.randn(n_out, d, generator=gen, dtype=torch.float64) * scale
    rank = max(1, d // 2) if fixed else None
    held = Covariances({"a": x_out.T @ x_out}, {"a": n_out}, {"a": "a"})
    cov = Covariances({"a": x_in.T @ x_in}, {"a": n_in}, {"a": "a", "b": "a"}, held_out=held)
    out = held_out_shares(cov, ["a", "b"], SubspaceConfig(energy=energy, rank=rank), line=-1.0)  # all past it
    share, k = _dense_share(x_in, x_out, energy, rank)
    small, _ = _dense_share(x_out, x_in, energy, rank)
    for name in ("a", "b"):  # b reads a's input
        s = out[name]
        assert s.k == k
        assert s.share == pytest.approx(share, rel=1e-9, abs=1e-12)
        assert s.share_small == pytest.approx(small, rel=1e-9, abs=1e-12)
        assert s.ratio == pytest.approx((1 - s.share) / max(1 - s.target, 1e-12))
        if rank is None:
            assert s.target == energy


def test_swapped_point_only_for_inputs_past_the_line(monkeypatch):
    """Adequate data: one eigh per input (C_in), no swapped point; a layer past the line adds the C_out eigh."""
    import fora_lightning.core.sufficiency as suff

    calls = []
    monkeypatch.setattr(suff, "spectrum", lambda c: calls.append(c.shape[0]) or spectrum(c))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 12, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.05, 12, dtype=torch.float64)
    held = Covariances({"a": x[1800:].T @ x[1800:]}, {"a": 200}, {"a": "a"})
    cov = Covariances({"a": x[:1800].T @ x[:1800]}, {"a": 1800}, {"a": "a", "b": "a"}, held_out=held)
    adequate = held_out_shares(cov, ["a", "b"], SubspaceConfig(energy=0.99))
    assert len(calls) == 1 and all(s.ratio <= RATIO_LINE and s.share_small is None for s in adequate.values())
    assert adequate["a"].tokens_needed is None and adequate["a"].expected_share is None
    calls.clear()
    narrow = held_out_shares(cov, ["a", "b"], SubspaceConfig(energy=0.99), line=-1.0)
    assert len(calls) == 2 and all(s.share_small is not None for s in narrow.values())
    assert narrow["a"].share == adequate["a"].share


def test_tokens_needed_solves_the_power_law_at_the_line():
    """Two points d(N) = t - s(N) of a power law: N* where the shortfall meets (line - 1)(1 - t), checked by hand."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(440, 40, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 40, dtype=torch.float64)
    x_in, x_out = x[:400], x[400:]
    held = Covariances({"a": x_out.T @ x_out}, {"a": 40}, {"a": "a"})
    cov = Covariances({"a": x_in.T @ x_in}, {"a": 400}, {"a": "a"}, held_out=held)
    s = held_out_shares(cov, ["a"], SubspaceConfig(energy=0.99), line=1.05)["a"]
    d_big, d_small, goal = s.target - s.share, s.target - s.share_small, 0.05 * (1 - s.target)
    assert d_small > d_big > goal  # the 40-row basis misses more; the 400-row one still misses more than the line
    b = math.log(d_small / d_big) / math.log(400 / 40)
    assert s.tokens_needed > 400
    assert d_big * (s.tokens_needed / 400) ** -b == pytest.approx(goal, rel=1e-9)
    assert s.expected_share == pytest.approx(s.target - d_big * (440 / 400) ** -b, rel=1e-12)


def test_collector_hold_out_sums_apart_and_adds_back(mlp):
    """The held-out batches' sums equal their dense X^T X; rest + held-out equals one pass without the slice."""
    loader = calibration_loader(n=200, batch_size=10)  # 20 batches: 0, 8, 16 held out
    targets = {"fc1": mlp.fc1, "fc2": mlp.fc2}

    def run(held):
        return collect_covariances(mlp, targets, loader, mlp, dtype=torch.float64, held_out=held)

    whole, split = run(None), run(lambda i: holdout_batch(i, 8))
    rows = torch.cat([b for i, b in enumerate(loader) if holdout_batch(i, 8)]).double()
    torch.testing.assert_close(split.held_out.sums["fc1"], rows.T @ rows)
    assert split.held_out.counts["fc1"] == 30 and split.counts["fc1"] == 170
    split.merge_held_out_()
    assert split.held_out is None and split.counts == whole.counts
    for o in whole.sums:
        torch.testing.assert_close(split.sums[o], whole.sums[o])


def test_fora_keeps_the_holdout_batches_and_bases_use_all_data():
    """FORA's bases with the estimate on equal those with it off; Protection.holdout holds batches 0 and 8."""
    loader = calibration_loader(n=160, batch_size=10)
    subspaces = {}
    for every in (8, 0):
        cb = FORA(
            calibration=loader,
            target_modules=["fc1", "fc2"],
            calibration_holdout=every,
            progress=False,
            covariance_dtype="float64",
        )
        torch.manual_seed(0)
        tiny_trainer(callbacks=[cb], max_steps=1).fit(MLP(), task_loader())
        subspaces[every] = cb.subspaces
        if every:
            batches = list(loader)
            assert len(cb.protection.holdout) == 2
            torch.testing.assert_close(cb.protection.holdout[1], batches[8])
            assert cb.protection.sufficiency["default"].layers  # measured
        else:
            assert cb.protection.holdout == [] and cb.protection.sufficiency == {}
    for name, s in subspaces[8].items():
        assert s.k == subspaces[0][name].k
        torch.testing.assert_close(s.spectrum, subspaces[0][name].spectrum)


# ---------------------------------------------------------------------------------------------- the demo model
def _rows(texts: list[str], module: CausalLMModule, batch_size: int) -> DataLoader:
    tok = module.tokenizer
    rows = [{"input_ids": tok(t)["input_ids"] + [tok.eos_token_id]} for t in texts]
    return DataLoader(rows, batch_size=batch_size, collate_fn=PadCollator(tok.pad_token_id, labels=False))


def _demo_texts() -> list[dict[str, str]]:
    return [json.loads(line) for line in open("assets/demo/translation/calibration.jsonl")]


def _calibrate(
    texts: list[str], tmp_path, match: str = "does not describe it well", **settings
) -> tuple[FORA, list[warnings.WarningMessage]]:
    module = CausalLMModule(model=DEMO, lr=0.0)
    calibration = _rows(texts, module, 8)
    cb = FORA(calibration=calibration, energy=0.99, weight_rank=0, progress=False, **settings)
    train = DataLoader([{**b, "labels": b["input_ids"]} for b in calibration][:1], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(callbacks=[cb], max_steps=1, logger=CSVLogger(tmp_path)).fit(module, train)
    return cb, [w for w in caught if match in str(w.message)]


def test_warning_fires_on_near_duplicate_prompts(tmp_path):
    """16 prompts one source word apart: the held-out batches read words the rest never did."""
    data = _demo_texts()
    words = data[0]["prompt"].split()
    texts = [" ".join([*words[:-2], r["prompt"].split()[2], "="]) for r in data[1:17]]
    cb, fired = _calibrate(texts, tmp_path)
    assert len(fired) == 1
    message = str(fired[0].message)
    assert message.startswith("FORA:") and "calibration_samples='auto'" in message and "tokens were used" in message
    estimate = cb.protection.sufficiency["default"]
    assert estimate.short and estimate.short[0].layer in message
    report = json.loads(next(tmp_path.rglob("fora_report.json")).read_text())["summary"]["calibration"]["default"]
    assert report["verdict"].startswith("short") and report["short_layers"] == len(estimate.short)
    assert "calibration 'default': short" in next(tmp_path.rglob("fora_report.md")).read_text()


def test_repeated_rows_are_named_though_the_estimate_passes_them(tmp_path):
    """4 prompts, each 8 times: every hold-out batch repeats the rest, so the held-out estimate says enough; the
    per-row digests count 4 distinct rows of 32 and warn."""
    texts = [r["prompt"] for r in _demo_texts()[:4]] * 8
    cb, fired = _calibrate(texts, tmp_path, match="repeat another row exactly")
    assert cb.protection.sufficiency["default"].short == []  # the blind spot the row count covers
    assert len(fired) == 1
    message = str(fired[0].message)
    assert message.startswith("FORA:") and "28 of the 32 calibration rows" in message and "(4 distinct)" in message
    report = json.loads(next(tmp_path.rglob("fora_report.json")).read_text())["summary"]["calibration"]["default"]
    assert report["rows"] == 32 and report["distinct_rows"] == 4
    assert "(4 distinct of 32 rows)" in next(tmp_path.rglob("fora_report.md")).read_text()


def test_warning_silent_on_the_demo_calibration(tmp_path):
    texts = [f"{r['prompt']} {r['response']}" for r in _demo_texts()[:200]]
    cb, fired = _calibrate(texts, tmp_path, match="FORA: FORA calibration")
    assert fired == []  # neither short nor repeated
    assert cb.protection.monitor.calibration["default"]["distinct_rows"] == 200
    estimate = cb.protection.sufficiency["default"]
    assert estimate.short == [] and max(s.ratio for s in estimate.layers.values()) < RATIO_LINE
    assert estimate.summary()["verdict"].startswith("enough")


def test_auto_samples_extend_prompts_only_calibration(tmp_path):
    """Prompts only: the basis misses what the model reads while answering; 'auto' calibrates again with samples."""
    texts = [r["prompt"] for r in _demo_texts()[:48]]
    cb, _ = _calibrate(texts, tmp_path, calibration_samples="auto", calibration_sample_tokens=8)
    estimate = cb.protection.sufficiency["default"]
    assert estimate.before is not None and estimate.before["own_continuations"]["short_layers"] > 0
    assert estimate.tokens > estimate.before["tokens"]  # the samples were added
    assert cb.protection.capabilities["default"]["tokens"] == estimate.tokens


def test_auto_samples_leave_adequate_data_alone(tmp_path):
    texts = [f"{r['prompt']} {r['response']}" for r in _demo_texts()[:48]]
    fixed, _ = _calibrate(texts, tmp_path / "a")
    auto, _ = _calibrate(texts, tmp_path / "b", calibration_samples="auto", calibration_sample_tokens=8)
    assert auto.protection.sufficiency["default"].before is None
    for name, s in auto.subspaces.items():
        torch.testing.assert_close(s.spectrum, fixed.subspaces[name].spectrum)


def test_fixed_samples_are_reproducible(tmp_path):
    texts = [r["prompt"] for r in _demo_texts()[:16]]
    states, spectra = [], []
    for i in range(2):
        torch.manual_seed(0)
        cb, _ = _calibrate(texts, tmp_path / str(i), calibration_samples=2, calibration_sample_tokens=6)
        spectra.append({n: s.spectrum for n, s in cb.subspaces.items()})
        states.append(cb.protection.capabilities["default"]["tokens"])
    assert states[0] == states[1] > 0
    for name in spectra[0]:
        torch.testing.assert_close(spectra[0][name], spectra[1][name])


def test_sufficiency_not_measured_with_one_batch():
    x = torch.randn(5, 3, dtype=torch.float64)
    cov = Covariances({"a": torch.zeros(3, 3, dtype=torch.float64)}, {"a": 0}, {"a": "a"})
    cov.held_out = Covariances({"a": x.T @ x}, {"a": 5}, {"a": "a"})
    estimate = sufficiency(cov, SubspaceConfig(), tokens=5)
    assert estimate.layers == {} and estimate.summary()["verdict"].startswith("not measured")
    assert sufficiency_warning(estimate, "default", 8) is None


@pytest.mark.parametrize("bad", [-1, "sometimes", 1.5, True])
def test_bad_calibration_samples_fail(bad):
    with pytest.raises((ValueError, TypeError), match="calibration_samples"):
        ForaConfig(calibration_samples=bad)
    with pytest.raises(ValueError, match="calibration_holdout"):
        ForaConfig(calibration_holdout=-1)


def test_fora_module_exposes_generate_continuations():
    """calibration_generate / calibration_samples through ForaModule (the CLI's path) reach the wrapped module's hook."""
    from fora_lightning import ForaModule

    module = CausalLMModule(model=DEMO)
    wrapped = ForaModule(module)
    batch = _rows(["translate : tasu rili niba ="], module, 1)
    out = wrapped.generate_continuations(next(iter(batch)), 4)
    assert out["input_ids"].shape[1] > next(iter(batch))["input_ids"].shape[1]
