"""Per-layer k under one global budget (``allocation``): water-filling against brute force, the scores against
dense float64 formulas, and a FORA fit whose k per layer matches an allocation from hand-collected covariances."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import calibration_loader, span_inputs, task_loader, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st

from fora_lightning import FORA, ForaConfig
from fora_lightning.core.allocation import allocate_ranks, layer_scores, water_fill
from fora_lightning.core.energy import energy_rank


def _descending(values: list[float]) -> torch.Tensor:
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5), min_size=1, max_size=3),
    budget=st.integers(0, 16),
    cap=st.integers(1, 5),
)
def test_water_fill_maximises_the_kept_score(layers: list[list[float]], budget: int, cap: int) -> None:
    """Brute force over every k vector (1 <= k_l <= cap_l, sum = clamped budget): the same total score."""
    scores = {f"l{i}": _descending(v) for i, v in enumerate(layers)}
    caps = {n: min(cap, s.numel()) for n, s in scores.items()}
    ks = water_fill(scores, budget, caps)
    total = max(len(scores), min(budget, sum(caps.values())))
    assert sum(ks.values()) == total
    assert all(1 <= ks[n] <= caps[n] for n in scores)
    best = max(
        sum(float(scores[n][:k].sum()) for n, k in zip(scores, combo, strict=True))
        for combo in itertools.product(*(range(1, caps[n] + 1) for n in scores))
        if sum(combo) == total
    )
    got = sum(float(scores[n][: ks[n]].sum()) for n in scores)
    assert got == pytest.approx(best, abs=1e-9)


def test_water_fill_one_threshold():
    """Every kept score (beyond each layer's first) is >= every dropped one."""
    scores = {"a": _descending([5, 4, 0.5, 0.1]), "b": _descending([3, 2, 1.5, 1.0]), "c": _descending([9, 0.01])}
    ks = water_fill(scores, 6)
    assert ks == {"a": 2, "b": 3, "c": 1}
    kept = [float(s[i]) for n, s in scores.items() for i in range(1, ks[n])]
    dropped = [float(s[i]) for n, s in scores.items() for i in range(ks[n], s.numel())]
    assert min(kept) >= max(dropped)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 9), d_in=st.integers(2, 9), seed=st.integers(0, 1000), scale=st.floats(0.1, 10.0))
def test_output_scores_match_dense_reference(d_out: int, d_in: int, seed: int, scale: float) -> None:
    """``lambda_i ||W0||_2^2 / sum_j lambda_j ||W0 q_j||^2`` from the eigendecomposition and the SVD; scale-free."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d_in, d_in, generator=gen, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    lam, q = torch.linalg.eigh(cov)
    lam, q = lam.flip(0), q.flip(1)
    sigma1 = torch.linalg.svdvals(w)[0]
    expected = lam * sigma1**2 / (lam * (w @ q).pow(2).sum(0)).sum()
    torch.testing.assert_close(layer_scores(lam, "output", w, cov), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        layer_scores(lam * scale, "output", w / scale, cov * scale), expected, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(layer_scores(lam, "trace"), lam / lam.sum(), rtol=1e-12, atol=0)


def test_budget_is_the_energy_rules_total():
    """A flat 10-dim spectrum (energy 0.9: k 9) and a peaked one (k 2): one threshold moves b's second k to a."""
    spectra = {"a": torch.ones(10, dtype=torch.float64), "b": _descending([10, 1, 1])}
    per_layer = {n: energy_rank(s, 0.9) for n, s in spectra.items()}
    assert per_layer == {"a": 9, "b": 2}
    assert allocate_ranks(spectra, 0.9, "trace") == {"a": 10, "b": 1}  # trace scores: a 0.1 x10, b 0.83 0.083 0.083
    assert allocate_ranks(spectra, 0.9, "trace", max_rank=5) == {"a": 5, "b": 2}  # budget 5 + 2


def test_settings_are_checked():
    with pytest.raises(ValueError, match="allocation must be"):
        ForaConfig(allocation="water")
    with pytest.raises(ValueError, match="rank=None"):
        ForaConfig(allocation="trace", rank=4)
    with pytest.raises(ValueError, match="source='activations'"):
        ForaConfig(allocation="output", source="weights")


@pytest.mark.parametrize("allocation", ["trace", "output"])
def test_fora_allocates_k_from_the_calibration_covariances(allocation: str, mlp) -> None:
    """The fitted k per layer = :func:`allocate_ranks` on float64 covariances of the base MLP's layer inputs."""
    x = span_inputs(128, seed=2).double()
    with torch.no_grad():
        h = torch.tanh(x @ mlp.fc1.weight.double().T + mlp.fc1.bias.double())
    covs = {"fc1": x.T @ x / len(x), "fc2": h.T @ h / len(h)}
    weights = {"fc1": mlp.fc1.weight.detach().double(), "fc2": mlp.fc2.weight.detach().double()}
    spectra = {n: torch.linalg.eigvalsh(c).flip(0) for n, c in covs.items()}
    expected = allocate_ranks(spectra, 0.8, allocation, weights, covs)
    per_layer = {n: energy_rank(s, 0.8) for n, s in spectra.items()}
    assert sum(expected.values()) == sum(per_layer.values())
    assert expected != per_layer  # the budget moves between the layers
    cb = FORA(
        calibration=calibration_loader(),
        target_modules=["fc1", "fc2"],
        energy=0.8,
        allocation=allocation,
        progress=False,
    )
    tiny_trainer(callbacks=[cb], max_steps=5).fit(mlp, task_loader())
    assert {n: s.k for n, s in cb.subspaces.items()} == expected
