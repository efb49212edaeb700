"""benchmarks/scale_out_model.py's per-rank byte formula: the shards add up to the whole, and it predicts the bytes
FORA holds after a real fit (benchmarks/_memory_worker.py's small Llama, every default, one process)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def model():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # the scripts import their neighbour _bench
        spec = importlib.util.spec_from_file_location("scale_out_model", BENCH / "scale_out_model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod


shapes = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 4), st.integers(0, 2)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, world=st.integers(1, 9))
def test_shards_add_up_to_the_single_process_bytes(model, shapes, world) -> None:
    """Summed over ranks: basis, U, V and spectrum are the single process's; S and delta are held whole on each rank."""
    layers, k_of = {}, {}
    for j, (d_out, d_in, frac, r, group) in enumerate(shapes):
        key = f"g{group}-{d_in}"  # layers sharing an input share its d_in and its k
        layers[f"l{j}"] = (d_out, d_in, k_of.setdefault(key, round(frac * d_in)), r, key)
    whole = model.persistent(layers, 0, 1)
    ranks = [model.persistent(layers, i, world) for i in range(world)]
    for field in ("basis", "u", "v", "spectrum"):
        assert sum(p[field] for p in ranks) == whole[field], field
    for field in ("s", "delta"):
        assert all(p[field] == whole[field] for p in ranks), field
    assert whole["basis"] == 4 * sum(
        {key: d_in * min(k, d_in - k) for _, d_in, k, _, key in layers.values()}.values()
    )  # the smaller of Q and its complement, once per distinct input


@pytest.mark.slow
def test_formula_predicts_a_real_fit(model) -> None:
    """One process, every default, one AdamW step (~20 s): FORA's ``nbytes_summary(spectrum=True)`` is the formula
    on the fit's own shapes and k, and the step's largest weight copy is one layer's weight."""
    spec = importlib.util.spec_from_file_location("_memory_worker", BENCH / "_memory_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    got = worker.run({"world": 1, "strategy": "single", "steps": 1})
    layers = model.from_shapes(got["shapes"])
    assert len(layers) == 28
    assert got["state_bytes"] == [sum(model.persistent(layers, 0, 1).values())]
    assert got["transient_bytes"] == [max(4 * o * i for o, i, *_ in layers.values())]
