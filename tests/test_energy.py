"""The energy rule and captured energy against brute-force float64 sums."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning.core.energy import captured_energy, cumulative_energy, energy_rank


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30),
    st.floats(0.05, 1.0),
    st.floats(1.0, 3.0),
    st.floats(0.0, 0.5),
)
def test_energy_rank_is_the_smallest_k_with_held_plus_top_k_reaching_energy(values, energy, total_scale, held):
    lam = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    total = total_scale * float(lam.sum())
    k = energy_rank(lam, energy, total, held)
    if total == 0:
        assert k == 0
        return
    reach = [j for j in range(1, len(values) + 1) if held + float(lam[:j].sum()) / total >= energy - 1e-12]
    assert k == (reach[0] if reach else len(values))  # never more than d, even when d directions are not enough


def test_cumulative_energy_and_its_degenerate_spectra():
    lam = torch.tensor([3.0, 1.0, -1e-9, 0.0])  # a negative rounding eigenvalue counts as 0
    torch.testing.assert_close(cumulative_energy(lam), torch.tensor([0.75, 1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        cumulative_energy(lam, total=8.0), torch.tensor([0.375, 0.5, 0.5, 0.5], dtype=torch.float64)
    )
    assert energy_rank(torch.zeros(3), 0.9) == 0 and energy_rank(torch.zeros(0), 0.9) == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 10), st.integers(0, 10), st.integers(0, 2**16))
def test_captured_energy_is_the_trace_fraction_and_complements_add_to_one(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov = a @ a.T
    frame = orthonormal(d, d, gen)
    q, rest = frame[:, :k], frame[:, k:]
    want = float(torch.trace(q.T @ cov @ q) / torch.trace(cov))
    assert captured_energy(q, cov) == pytest.approx(want, abs=1e-12)
    assert captured_energy(rest, cov, complement=True) == pytest.approx(want, abs=1e-12)
    # for C's own top-k eigenvectors it is the cumulative energy of its spectrum
    evals, evecs = torch.linalg.eigh(cov)
    if k:
        assert captured_energy(evecs.flip(1)[:, :k], cov) == pytest.approx(
            float(cumulative_energy(evals.flip(0))[k - 1]), abs=1e-12
        )
    assert captured_energy(q, torch.zeros(d, d)) != captured_energy(q, torch.zeros(d, d))  # NaN without energy
