"""Several capabilities and chained fine-tunes: the algebra against dense float64 references, and the Callback."""

from __future__ import annotations

import pytest
import torch
from conftest import D_IN, MLP, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fora_lightning import FORA
from fora_lightning.core.capabilities import (
    capability_weights,
    combine_covariances,
    extend_subspace,
    gpm_extend,
    principal_cosines,
    union_frame,
)
from fora_lightning.core.covariance import Covariances
from fora_lightning.core.energy import captured_energy
from fora_lightning.core.subspace import LayerSubspace, select_rank, spectrum
from fora_lightning.core.subspace_file import read_metadata


def _low_rank_cov(d: int, k: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A PSD d x d matrix of rank k with distinct eigenvalues."""
    q = orthonormal(d, k, gen)
    lam = scale * torch.linspace(2.0, 0.5, k, dtype=torch.float64) if k else torch.zeros(0, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T


def _proj(b: torch.Tensor) -> torch.Tensor:
    return b @ b.T


# ---------------------------------------------------------------------------------------------- combine
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(1, 60), min_size=1, max_size=4), st.integers(0, 2**16), st.booleans())
def test_combine_is_weighted_mean_of_token_normalised_covariances(d, ns, seed, weighted):
    gen = torch.Generator().manual_seed(seed)
    xs = {f"c{i}": torch.randn(n, d, generator=gen, dtype=torch.float64) * (i + 1) for i, n in enumerate(ns)}
    per = {
        c: Covariances(
            sums={"fc": x.T @ x, "g": 2 * x.T @ x},
            counts={"fc": len(x), "g": len(x)},
            owner={"fc": "fc", "h": "fc", "g": "g"},
        )
        for c, x in xs.items()
    }
    raw = {c: float(i + 1) for i, c in enumerate(xs)} if weighted else None
    out = combine_covariances(per, raw)
    w = {c: (raw[c] if raw else 1.0) for c in xs}
    ref = sum(w[c] * (x.T @ x) / len(x) for c, x in xs.items()) / sum(w.values())
    torch.testing.assert_close(out.covariance("fc"), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.covariance("h"), ref, rtol=1e-10, atol=1e-12)  # shared input
    torch.testing.assert_close(out.covariance("g"), 2 * ref, rtol=1e-10, atol=1e-12)
    assert out.counts["fc"] == sum(ns)


def test_a_big_capability_does_not_drown_a_small_one():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(10_000, 2, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64
    )
    small = torch.randn(10, 2, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[0, 0, 1.0, 0], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    per = {n: Covariances({"fc": x.T @ x}, {"fc": len(x)}, {"fc": "fc"}) for n, x in (("big", big), ("small", small))}
    c = combine_covariances(per).covariance("fc")
    small_share = float(torch.trace(c[2:, 2:]) / torch.trace(c))
    assert 0.3 < small_share < 0.7  # pooled sums would give ~0.001


def test_capability_weight_errors_name_the_capability():
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['x'\]"):
        capability_weights(["a", "b"], {"a": 1.0, "x": 1.0})
    with pytest.raises(ValueError, match=r"capability_weights\['b'\] = -1"):
        capability_weights(["a", "b"], {"a": 1.0, "b": -1})
    with pytest.raises(ValueError, match="all zero"):
        capability_weights(["a"], {"a": 0.0})
    assert capability_weights(["a", "b"], {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}


def test_combine_refuses_capabilities_that_saw_different_layers():
    x = torch.eye(3)
    a = Covariances({"fc": x}, {"fc": 1}, {"fc": "fc", "q": "fc"})
    b = Covariances({"fc": x}, {"fc": 1}, {"fc": "fc", "q": "q"})
    with pytest.raises(ValueError, match="disagree on layer 'q'"):
        combine_covariances({"a": a, "b": b})


# ---------------------------------------------------------------------------------------------- union
@settings(max_examples=25, deadline=None)
@given(st.integers(2, 14), st.lists(st.integers(0, 6), min_size=1, max_size=3), st.integers(0, 2**16))
def test_union_frame_spans_the_per_capability_bases(d, ks, seed):
    gen = torch.Generator().manual_seed(seed)
    covs = [_low_rank_cov(d, min(k, d), gen, scale=10.0**i) for i, k in enumerate(ks)]
    w = [1.0 / len(covs)] * len(covs)
    values, frame, k = union_frame(covs, w, energy=1.0)
    torch.testing.assert_close(frame.T @ frame, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)
    # reference: projector onto span of all eigenvectors with nonzero eigenvalue, per capability
    refs = [torch.linalg.eigh(c)[1][:, torch.linalg.eigh(c)[0] > 1e-9] for c in covs]
    stacked = torch.cat(refs, 1)
    ref_rank = int(torch.linalg.matrix_rank(stacked, atol=1e-6)) if stacked.shape[1] else 0
    assert k == ref_rank
    if k:
        u = torch.linalg.svd(stacked, full_matrices=False)[0][:, :k]
        torch.testing.assert_close(_proj(frame[:, :k]), _proj(u), atol=1e-8, rtol=0)
    combined = sum(wi * c for wi, c in zip(w, covs))
    torch.testing.assert_close(values, torch.diagonal(frame.T @ combined @ frame), atol=1e-10, rtol=0)
    assert torch.all(values[:k][:-1] >= values[:k][1:] - 1e-12)


def test_union_keeps_a_low_energy_capability_that_the_combined_rule_drops():
    gen = torch.Generator().manual_seed(1)
    loud = _low_rank_cov(10, 3, gen, scale=100.0)
    quiet_dir = orthonormal(10, 1, gen)
    quiet_dir = quiet_dir - _proj(torch.linalg.eigh(loud)[1][:, -3:]) @ quiet_dir
    quiet_dir = quiet_dir / quiet_dir.norm()
    quiet = quiet_dir @ quiet_dir.T
    _, frame, k = union_frame([loud, quiet], [0.5, 0.5], energy=0.99)
    assert k == 4
    assert captured_energy(frame[:, :k], quiet) > 0.999
    evals, evecs = spectrum(0.5 * loud + 0.5 * quiet)  # eigenvalues 100, 62.5, 25, 0.5: the top 3 hold 99.7%
    k_comb = select_rank(evals, 0.99)
    assert k_comb == 3 and captured_energy(evecs[:, :k_comb], quiet) < 1e-8


# ---------------------------------------------------------------------------------------------- GPM
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 14), st.integers(0, 7), st.integers(1, 7), st.floats(0.5, 1.0), st.integers(0, 2**16))
def test_gpm_extend_adds_the_fewest_residual_directions(d, k, k_cov, energy, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d)
    q = orthonormal(d, k, gen)
    cov = _low_rank_cov(d, min(k_cov, d), gen)
    merged, k_new = gpm_extend(q, cov, energy)
    assert merged.shape == (d, k + k_new)
    torch.testing.assert_close(merged[:, :k], q)  # old directions kept as they were
    torch.testing.assert_close(merged.T @ merged, torch.eye(k + k_new, dtype=torch.float64), atol=1e-9, rtol=0)
    total = float(torch.trace(cov))
    assert captured_energy(merged, cov) >= energy - 1e-5  # residual eigenvalues below 1e-6 of the top are not added
    # dense reference: the new directions are the top eigenvectors of P C P, P = I - QQ^T
    p = torch.eye(d, dtype=torch.float64) - _proj(q)
    lam, vecs = torch.linalg.eigh(p @ cov @ p)
    lam, vecs = lam.flip(0), vecs.flip(1)
    if k_new:
        if k_new < d - k and lam[k_new - 1] - lam[k_new] > 1e-6:
            torch.testing.assert_close(_proj(merged[:, k:]), _proj(vecs[:, :k_new]), atol=1e-7, rtol=0)
        # minimal: one direction fewer would not have been enough
        fewer = float(torch.trace(q.T @ cov @ q)) + float(lam[: k_new - 1].sum())
        assert fewer < energy * total + 1e-9


def test_gpm_extend_adds_nothing_when_the_basis_already_holds_the_energy():
    gen = torch.Generator().manual_seed(2)
    cov = _low_rank_cov(8, 3, gen)
    q = torch.linalg.eigh(cov)[1][:, -3:]
    merged, k_new = gpm_extend(q, cov, 0.99)
    assert k_new == 0 and merged is q
    _, k_new = gpm_extend(q[:, :2], cov, 0.999999, max_new=0)
    assert k_new == 0


# ---------------------------------------------------------------------------------------------- angles
@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**16))
def test_principal_cosines_match_dense_reference_and_complement(d, k, r, seed):
    gen = torch.Generator().manual_seed(seed)
    k, r = min(k, d - 1), min(r, d)
    q, v = orthonormal(d, k, gen), orthonormal(d, r, gen)
    ref = torch.linalg.svdvals(q.T @ v)
    torch.testing.assert_close(principal_cosines(q, v), ref, atol=1e-9, rtol=0)
    comp = torch.linalg.qr(torch.cat([q, torch.eye(d, dtype=torch.float64)], 1))[0][:, k:d]
    torch.testing.assert_close(principal_cosines(comp, v, complement=True), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- Callback


def _span(i: int) -> torch.Tensor:
    basis, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(7)))
    return basis[:, 5 * i : 5 * i + 5]


def _inputs(i: int, n: int, seed: int) -> torch.Tensor:
    """Capability i's inputs: span i; C's (i = 2) also reach into B's span, so learning C pulls on B."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen) @ _span(i).T
    return x + 0.5 * torch.randn(n, 5, generator=gen) @ _span(1).T if i == 2 else x


def _teacher_targets(i: int, x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + i)
    w1, w2 = torch.randn(24, D_IN, generator=gen) / 2, torch.randn(8, 24, generator=gen)
    return torch.tanh(x @ w1.T) @ w2.T


def _task(i: int, n: int = 256, seed: int = 0) -> DataLoader:
    x = _inputs(i, n, seed + 10 * i)
    return DataLoader(TensorDataset(x, _teacher_targets(i, x)), batch_size=32)


def _calib(i: int, n: int = 128) -> DataLoader:
    return DataLoader(_inputs(i, n, 50 + i), batch_size=32)


@torch.no_grad()
def _loss(model: nn.Module, i: int) -> float:
    x = _inputs(i, 256, 999 + i)  # held out
    return float(nn.functional.mse_loss(model(x), _teacher_targets(i, x)))


def test_several_capabilities_are_all_protected_and_recorded(tmp_path):
    torch.manual_seed(0)
    model = MLP(lr=3e-2)
    before = {i: model.fc1(_inputs(i, 64, 5)).detach() for i in (0, 1)}
    path = tmp_path / "ab.safetensors"
    fora = FORA(
        calibration={"A": _calib(0), "B": _calib(1, n=512)},
        target_modules=["fc1"],
        energy=0.999,
        weight_rank=0,
        combine="union",
        subspaces=path,
        progress=False,
    )
    tiny_trainer(max_steps=30, callbacks=[fora]).fit(model, _task(2))
    assert fora.subspaces["fc1"].k == 10
    for i in (0, 1):
        torch.testing.assert_close(model.fc1(_inputs(i, 64, 5)).detach(), before[i], atol=1e-4, rtol=1e-4)
    meta = read_metadata(path)
    assert meta["capabilities"]["A"]["tokens"] == 128 and meta["capabilities"]["B"]["tokens"] == 512
    assert meta["capabilities"]["A"]["weight"] == 0.5
    assert meta["combine"] == "union" and meta["chain"][0]["capabilities"] == ["A", "B"]
    assert min(meta["layers"]["fc1"]["capability_energy"].values()) > 0.999


def test_capability_weights_must_match_the_calibration_names():
    fora = FORA(calibration={"A": _calib(0)}, capability_weights={"X": 1.0}, target_modules=["fc1"], progress=False)
    with pytest.raises(ValueError, match=r"missing \['A'\], unknown \['X'\]"):
        tiny_trainer(max_steps=1, callbacks=[fora]).fit(MLP(), _task(2))


def test_extend_recomputes_the_weight_triplets_from_the_tuned_weight():
    gen = torch.Generator().manual_seed(3)
    w_new = torch.randn(6, 8, generator=gen)
    q = orthonormal(8, 2, gen).float()
    sub = LayerSubspace(6, 8, 2, q, False, torch.zeros(6, 2), torch.zeros(2), torch.zeros(8, 2))
    cov = _low_rank_cov(8, 3, gen)
    merged, k_new = extend_subspace(sub, w_new, cov, energy=0.999, weight_rank=2)
    _, s, vh = torch.linalg.svd(w_new.double())
    torch.testing.assert_close(merged.s.double(), s[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_proj(merged.v.double()), _proj(vh[:2].T), atol=1e-5, rtol=0)
    assert merged.k == 2 + k_new and k_new > 0
    assert merged.energy >= 0.999 - 1e-9


def test_chain_a_then_b_then_c_keeps_a_and_b(tmp_path):
    """A is learned plainly; B is learned keeping A, then extended into the file; C is learned keeping A and B."""
    torch.manual_seed(0)
    model = MLP(lr=3e-2, weight_decay=0.1)
    losses: dict[str, dict[str, float]] = {}

    def record(step: str) -> None:
        losses[step] = {name: _loss(model, i) for i, name in enumerate("ABC")}

    record("base")
    tiny_trainer(max_steps=150).fit(model, _task(0))  # step 0: learn A (plain)
    record("A")
    fa, fab = tmp_path / "a.safetensors", tmp_path / "ab.safetensors"
    fora_b = FORA(
        calibration={"A": _calib(0)},
        target_modules=["fc1"],
        energy=0.999,
        weight_rank=0,
        subspaces=fa,
        extend_to=fab,
        extend_calibration={"B": _calib(1)},
        progress=False,
    )
    tiny_trainer(max_steps=150, callbacks=[fora_b]).fit(model, _task(1))  # step 1: learn B, keep A; extend with B
    record("B")
    control = MLP()
    control.load_state_dict(model.state_dict())
    fora_c = FORA(target_modules=["fc1"], energy=0.999, weight_rank=0, subspaces=fab, progress=False)
    tiny_trainer(max_steps=150, callbacks=[fora_c]).fit(model, _task(2))  # step 2: learn C, keep A and B
    record("C")
    fora_ctl = FORA(target_modules=["fc1"], weight_rank=0, subspaces=fa, progress=False)  # A only: B unprotected
    tiny_trainer(max_steps=150, callbacks=[fora_ctl]).fit(control, _task(2))

    meta = read_metadata(fab)
    assert list(meta["capabilities"]) == ["A", "B"] and [c["method"] for c in meta["chain"]] == ["activations", "gpm"]
    assert meta["layers"]["fc1"]["k"] == 10
    assert losses["A"]["A"] < 0.5 * losses["base"]["A"]  # A was learned
    assert losses["B"]["B"] < 0.5 * losses["A"]["B"]  # B was learned ...
    assert abs(losses["B"]["A"] - losses["A"]["A"]) < 1e-4 * (1 + losses["A"]["A"])  # ... keeping A
    assert losses["C"]["C"] < 0.6 * losses["B"]["C"]  # C is learned ...
    assert abs(losses["C"]["A"] - losses["A"]["A"]) < 1e-4 * (1 + losses["A"]["A"])  # ... keeping A
    assert abs(losses["C"]["B"] - losses["B"]["B"]) < 1e-4 * (1 + losses["B"]["B"])  # ... and B
    assert _loss(control, 1) > 1.5 * losses["B"]["B"]  # without the extension B is forgotten
