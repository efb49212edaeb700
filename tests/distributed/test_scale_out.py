"""Scale-out: under FSDP2 each of W ranks projects only its rows, so its FORA work is 1/W of one process's.

Counted structurally (no timing): the rows and flops ``4 rows d_in (k + r)`` of every tensor the layout hands
``project`` (gradients) and ``project_weight_`` (post-step re-projection), over the same steps, on 2 gloo ranks
and on one process. fc1 (24 rows) splits 12 + 12, fc2 (5 rows) 3 + 2, as ``torch.chunk`` does.
"""

from __future__ import annotations

import pytest

from tests.distributed import _worker as W
from tests.distributed.harness import launch

STEPS = 4


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, int]]:
    out = launch(
        {"world": 2, "scenarios": [{"name": "work", "strategy": "fsdp2", "steps": STEPS, "count_work": True}]},
        tmp_path_factory.mktemp("scale"),
        timeout=200,
    )
    assert "error" not in out["work"], out["work"].get("error")
    return out["work"]["work"]


@pytest.fixture(scope="module")
def single() -> dict[str, int]:
    (work,) = W.run({"strategy": "single", "world": 1, "steps": STEPS, "count_work": True})["work"]
    return work


def test_two_ranks_together_do_the_single_process_work(per_rank, single):
    assert single["flops"] > 0 and single["grad_rows"] == single["weight_rows"] == STEPS * (24 + 5)
    for key in ("grad_rows", "weight_rows", "flops"):
        assert sum(w[key] for w in per_rank) == single[key], (key, per_rank, single)


def test_each_rank_does_about_half(per_rank, single):
    """Rank shares follow the row split: 12 + 3 and 12 + 2 of the 29 rows per step (1/W up to one row per layer)."""
    assert [w["grad_rows"] for w in per_rank] == [STEPS * (12 + 3), STEPS * (12 + 2)]
    for w in per_rank:
        assert 0.45 <= w["flops"] / single["flops"] <= 0.55, (w, single)
