"""Streaming covariances and bases against dense float64 references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fora_lightning.core.covariance import collect_covariances, eval_mode
from fora_lightning.core.subspace import SubspaceConfig, estimate_subspaces, select_rank, spectrum, weight_triplets
from fora_lightning.core.targets import find_targets, name_matches


class SharedInput(nn.Module):
    """q/k/v read one tensor; o reads another (like attention)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(self.q(x) * self.k(x) + self.v(x))


def test_covariance_matches_dense_reference_masks_padding_and_shares_inputs():
    torch.manual_seed(0)
    model = SharedInput()
    batches = []
    for b in range(3):
        x = torch.randn(2, 5, 6)
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[b % 2, 3:] = 0  # padding positions
        x[mask == 0] = 1e3  # padding must not reach the sums
        batches.append({"x": x, "attention_mask": mask})
    targets = find_targets(model, ["q", "k", "v", "o"])
    cov = collect_covariances(model, targets, batches, lambda b: model(**b), dtype=torch.float64)
    assert cov.owner == {"q": "q", "k": "q", "v": "q", "o": "o"}
    xs = torch.cat([b["x"][b["attention_mask"] != 0] for b in batches]).double()
    torch.testing.assert_close(cov.covariance("k"), xs.T @ xs / xs.shape[0])
    assert cov.counts["q"] == xs.shape[0]
    with torch.no_grad():
        hidden = torch.cat(
            [(model.q(b["x"]) * model.k(b["x"]) + model.v(b["x"]))[b["attention_mask"] != 0] for b in batches]
        ).double()
    torch.testing.assert_close(cov.covariance("o"), hidden.T @ hidden / hidden.shape[0])


def test_calibration_restores_each_submodule_training_flag():
    model = SharedInput()
    model.train()
    model.v.eval()  # the user left this one in eval
    seen = []
    model.q.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    collect_covariances(model, {"q": model.q}, [torch.randn(3, 6)], model)
    assert seen == [False]
    assert model.training and model.q.training and not model.v.training


def test_progress_wraps_the_batches_and_changes_no_sum():
    torch.manual_seed(0)
    model = SharedInput()
    batches = [torch.randn(3, 6) for _ in range(4)]
    passed: list[torch.Tensor] = []

    def progress(it):
        for b in it:
            passed.append(b)
            yield b

    wrapped = collect_covariances(model, {"q": model.q}, batches, model, dtype=torch.float64, progress=progress)
    plain = collect_covariances(model, {"q": model.q}, batches, model, dtype=torch.float64)
    assert [id(b) for b in passed] == [id(b) for b in batches]
    xs = torch.cat(batches).double()
    torch.testing.assert_close(wrapped.covariance("q"), xs.T @ xs / xs.shape[0])
    torch.testing.assert_close(wrapped.covariance("q"), plain.covariance("q"))


def test_eval_mode_restores_on_error():
    model = SharedInput()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert all(m.training for m in model.modules())


def test_empty_loader_nan_inputs_and_unreached_layers_raise():
    model = SharedInput()
    targets = find_targets(model, ["q", "o"])
    with pytest.raises(ValueError, match="calibration loader is empty"):
        collect_covariances(model, targets, [], model)
    with pytest.raises(ValueError, match=r"non-finite.*'q'"):
        collect_covariances(model, targets, [torch.full((2, 6), float("nan"))], model)
    with pytest.raises(ValueError, match="never reached"):
        collect_covariances(model, targets, [torch.randn(2, 6)], model.q)


def test_target_matching_on_dot_boundaries_and_regex():
    names = ["model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj"]
    assert [n for n in names if name_matches(n, ["1.mlp.up_proj"])] == names[:1]
    assert all(name_matches(n, ["up_proj"]) for n in names)
    assert not name_matches("model.layers.1.mlp.up_proj", ["p_proj"])
    assert [n for n in names if name_matches(n, r".*\.1\.mlp\..*")] == names[:1]


def test_target_errors_name_what_is_wrong():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"matched no module.*Linear layers available \(1\): 0"):
        find_targets(model, ["q_proj"])
    with pytest.raises(TypeError, match="'1' is a LayerNorm, not an nn.Linear"):
        find_targets(model, ["1"])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 100.0), min_size=1, max_size=40),
    st.floats(0.05, 1.0),
    st.one_of(st.none(), st.integers(0, 50)),
)
def test_select_rank_is_smallest_k_reaching_energy(values, energy, max_rank):
    lam = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = select_rank(lam, energy=energy, max_rank=max_rank)
    total = float(lam.sum())
    if total == 0:
        assert k == 0
        return
    held = lambda j: float(lam[:j].sum()) / total  # noqa: E731
    k_ref = next(j for j in range(1, len(values) + 1) if held(j) >= energy - 1e-12)
    assert k == (min(k_ref, max_rank) if max_rank is not None else k_ref)


def test_fixed_rank_larger_than_dimension_is_clamped_with_warning():
    with pytest.warns(UserWarning, match="rank=9 exceeds d_in=4 for layer 'fc'"):
        assert select_rank(torch.ones(4), rank=9, name="fc") == 4


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 4), st.integers(0, 1000))
def test_bases_are_eigenvectors_and_singular_triplets(d_out, d_in, r, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen)
    x = torch.randn(30, d_in, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, d_in, dtype=torch.float64)
    c = x.T @ x / 30
    evals, evecs = spectrum(c)
    assert torch.all(evals[:-1] >= evals[1:] - 1e-12)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, c)
    u, s, v = weight_triplets(w, r)
    r_eff = min(r, d_out, d_in)
    assert u.shape == (d_out, r_eff) and v.shape == (d_in, r_eff)
    torch.testing.assert_close((u.T @ w @ v).double(), torch.diag(s).double(), atol=1e-4, rtol=1e-4)


def test_weight_source_uses_top_right_singular_vectors_and_gradient_mode_uses_complement():
    torch.manual_seed(0)
    w = torch.randn(8, 10)
    sub = estimate_subspaces({"fc": w}, SubspaceConfig(rank=3, source="weights", weight_rank=0))["fc"]
    _, _, vh = torch.linalg.svd(w.double())
    top = vh[:3].T
    torch.testing.assert_close((sub.basis.double() @ sub.basis.double().T), top @ top.T, atol=1e-5, rtol=0)
    comp = estimate_subspaces(
        {"fc": w}, SubspaceConfig(rank=8, source="weights", weight_rank=0), allow_complement=True
    )["fc"]
    assert comp.complement and comp.basis.shape == (10, 2) and comp.k == 8
    assert float((comp.basis.double().T @ vh[:8].T).abs().max()) < 1e-5


def test_random_source_needs_rank_and_is_orthonormal():
    w = torch.randn(6, 9)
    with pytest.raises(ValueError, match="source='random' needs an explicit rank"):
        estimate_subspaces({"fc": w}, SubspaceConfig(source="random"))
    sub = estimate_subspaces({"fc": w}, SubspaceConfig(source="random", rank={"fc": 4}, weight_rank=0))["fc"]
    torch.testing.assert_close(sub.basis.T @ sub.basis, torch.eye(4), atol=1e-5, rtol=0)
