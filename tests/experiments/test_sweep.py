"""The sweep's points, the seed aggregation and the Pareto marking, on synthetic numbers."""

from __future__ import annotations

import csv
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.setting import EvalSet, Setting
from experiments.sweep import Point, aggregate, expand, pareto_mask, set_knob
from experiments.sweep_output import pareto_plot, sweep_results, sweep_table, write_csv


def test_set_knob_reaches_nested_model_overrides_and_leaves_the_input_alone():
    args = {"lora_rank": 8, "model": {"lr": 5e-3}}
    out = set_knob(args, "model.lr", 1e-2)
    assert out == {"lora_rank": 8, "model": {"lr": 1e-2}} and args["model"]["lr"] == 5e-3
    assert set_knob({}, "model.lr", 1e-3) == {"model": {"lr": 1e-3}}
    with pytest.raises(ValueError, match="not a mapping"):
        set_knob({"model": 3}, "model.lr", 1e-3)


def test_expand_one_knob_at_a_time_with_the_own_config_once():
    methods = {"fora": {"energy": 0.99}, "l2sp": {"lambda_": 0.1}, "plain_ft": {}}
    sweeps = {"fora": {"energy": [0.9, 0.99, 0.995], "model.lr": [1e-3]}, "l2sp": {"lambda_": [0.01, 1.0]}}
    keys = [p.key for p in expand(methods, ["fora", "l2sp", "plain_ft"], sweeps)]
    assert keys == [
        "fora",
        "fora[energy=0.9]",
        "fora[energy=0.995]",
        "fora[model.lr=0.001]",
        "l2sp",
        "l2sp[lambda_=0.01]",
        "l2sp[lambda_=1.0]",
        "plain_ft",
    ]
    assert [p.key for p in expand(methods, ["fora"], None)] == ["fora"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=6))
def test_aggregate_matches_statistics(values):
    stats = aggregate([{"x": v, "flag": True, "name": "a"} for v in values])
    assert set(stats) == {"x"}  # booleans and strings are not aggregated
    s = stats["x"]
    assert s["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert s["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0, abs=1e-6)
    assert (s["min"], s["max"], s["n"]) == (min(values), max(values), len(values))


def test_pareto_mask_by_hand():
    xs = [0.1, 0.5, 0.5, 0.9, 0.3, 0.9]
    ys = [0.9, 0.5, 0.6, 0.1, 0.3, 0.1]
    # (0.5, 0.5) is beaten by (0.5, 0.6); (0.3, 0.3) by (0.5, 0.6); the two (0.9, 0.1) tie: both stay
    assert pareto_mask(xs, ys) == [True, False, True, True, False, True]
    # lower-is-better y (a perplexity): the smallest y at the largest x wins
    assert pareto_mask([1, 2, 2], [5.0, 4.0, 3.0], higher_y=False) == [False, False, True]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=12))
def test_pareto_mask_front_is_nondominated_and_dominates_the_rest(pts):
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mask = pareto_mask(xs, ys)
    front = [p for p, m in zip(pts, mask, strict=True) if m]
    assert front
    for p, on in zip(pts, mask, strict=True):
        beaten = any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)
        assert on == (not beaten)


def _setting(tmp_path) -> Setting:
    ev = EvalSet(path=str(tmp_path / "x.jsonl"), name="keep")
    return Setting(
        setting="synthetic",
        model={},
        data={},
        preserved=ev,
        new_task=EvalSet(path=str(tmp_path / "t.jsonl"), name="task"),
        heldout=ev,
        methods={"fora": {}, "l2sp": {}},
        target_modules=["q_proj"],
    )


def _row(new: float, kept: float) -> dict[str, float]:
    return {
        "preserved": kept,
        "preserved_base": 1.0,
        "new_task": new,
        "kl": 0.1,
        "leakage": 0.2,
        "heldout_loss_delta": 0.05,
        "trainable_params": 100,
        "wall_s": 1.0,
        "k_mean": 3.0,
    }


def test_sweep_outputs_on_synthetic_rows(tmp_path):
    setting = _setting(tmp_path)
    points = [Point("fora", {}), Point("l2sp", {"lambda_": 0.1}), Point("l2sp", {"lambda_": 1.0}, "lambda_", 1.0)]
    rows = {
        "fora": {0: _row(0.6, 0.9), 1: _row(0.8, 0.7)},  # mean (0.7, 0.8)
        "l2sp": {0: _row(0.5, 0.5), 1: _row(0.5, 0.7)},  # mean (0.5, 0.6): beaten by fora
        "l2sp[lambda_=1.0]": {0: _row(0.1, 1.0), 1: _row(0.1, 1.0)},  # mean (0.1, 1.0): on the front
    }
    base = {"preserved": 1.0, "new_task": 0.0, "heldout_loss": 2.0}
    res = sweep_results(setting, base, points, rows, [0, 1])
    by_key = {p["key"]: p for p in res["points"]}
    assert {k: p["pareto"] for k, p in by_key.items()} == {"fora": True, "l2sp": False, "l2sp[lambda_=1.0]": True}
    assert by_key["fora"]["stats"]["new_task"]["mean"] == pytest.approx(0.7)
    assert by_key["fora"]["stats"]["preserved"]["std"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    write_csv(res, tmp_path / "r.csv")
    lines = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [line["key"] for line in lines] == ["l2sp", "l2sp[lambda_=1.0]", "fora"]  # display order
    assert float(lines[2]["preserved_min"]) == 0.7 and float(lines[2]["preserved_max"]) == 0.9
    table = sweep_table(res, setting, 10)
    assert "70.0% ± 14.1" in table and table.count("**yes**") == 2 and "lambda_ = 1.0" in table
    pareto_plot(res, setting, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_compare_runs_own_points_first_then_one_swept_value_of_each_method_per_round():
    from experiments.compare import _interleave

    points = expand(
        {"fora": {"energy": 0.99}, "l2sp": {"lambda_": 0.1}},
        ["fora", "l2sp"],
        {"fora": {"energy": [0.9, 0.95]}, "l2sp": {"lambda_": [1.0, 10.0, 100.0]}},
    )
    assert [p.key for p in _interleave(points)] == [
        "fora",
        "l2sp",
        "fora[energy=0.9]",
        "l2sp[lambda_=1.0]",
        "fora[energy=0.95]",
        "l2sp[lambda_=10.0]",
        "l2sp[lambda_=100.0]",
    ]
