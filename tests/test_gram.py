"""The cheaper covariance products (core/gram.py) against dense float64 references."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fora_lightning.core.covariance import collect_covariances
from fora_lightning.core.gram import block_edges, flop_fraction, gram_, mirror_


class WideAndShared(nn.Module):
    """q/k/up read one d-wide input; ``up`` widens to f; ``down`` (f -> d, a *wide* input) reads the hidden state."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention = self.q(x) * self.k(x)
        return self.down(torch.tanh(self.up(x))) + attention


def _batches(gen: torch.Generator, n: int, b: int, t: int, d: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        x = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
        lengths = torch.randint(1, t + 1, (b,), generator=gen)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        x[mask == 0] = 1e3  # padding must not reach the sums
        out.append({"x": x, "attention_mask": mask})
    return out


def _inputs(model: WideAndShared, batches: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], ...]:
    """Per batch, the non-padding rows of the shared (q/k/up) input and of down's input."""
    shared, hidden = [], []
    with torch.no_grad():
        for bt in batches:
            x, keep = bt["x"], bt["attention_mask"] != 0
            shared.append(x[keep])
            hidden.append(torch.tanh(model.up(x))[keep])
    return shared, hidden


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 9), f=st.integers(1, 17), panel=st.integers(0, 20), seed=st.integers(0, 10_000))
def test_panelled_upper_triangle_equals_the_full_product_in_float64(d: int, f: int, panel: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = WideAndShared(d, f).double()
    batches = _batches(gen, 3, 2, 5, d)
    targets = {"q": model.q, "k": model.k, "up": model.up, "down": model.down}
    cov = collect_covariances(model, targets, batches, lambda b: model(**b), dtype=torch.float64, panel=panel)
    assert cov.owner == {"q": "q", "k": "q", "up": "q", "down": "down"}
    shared, hidden = (torch.cat(rows) for rows in _inputs(model, batches))
    torch.testing.assert_close(cov.covariance("k"), shared.T @ shared / shared.shape[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov.covariance("down"), hidden.T @ hidden / hidden.shape[0], rtol=1e-12, atol=1e-12)
    assert cov.counts == {"q": shared.shape[0], "down": hidden.shape[0]}
    for s in cov.sums.values():  # the strict lower block triangle is the upper one's exact mirror
        edges = block_edges(s.shape[0], panel)
        for lo, hi in zip(edges[1:-1], edges[2:]):
            assert torch.equal(s[lo:hi, :lo], s[:lo, lo:hi].T)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(0, 12), d=st.integers(1, 23), panel=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_gram_touches_only_the_upper_block_triangle_and_its_flops_are_b_plus_1_over_2b(t, d, panel, seed):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    acc = torch.full((d, d), 0.0, dtype=torch.float64)
    gram_(acc, x, panel)
    edges = block_edges(d, panel)
    upper = torch.zeros(d, d, dtype=torch.bool)
    for lo, hi in zip(edges[:-1], edges[1:]):
        upper[lo:hi, lo:] = True
    full = x.T @ x
    torch.testing.assert_close(acc[upper], full[upper], rtol=1e-12, atol=1e-12)
    assert not acc[~upper].any()
    sizes = {hi - lo for lo, hi in zip(edges[:-1], edges[1:])}
    if len(sizes) == 1:  # equal blocks: exactly (b + 1) / (2b) of the entries
        assert upper.sum().item() == flop_fraction(d, panel) * d * d
    torch.testing.assert_close(mirror_(acc, panel), full, rtol=1e-12, atol=1e-12)


def test_flop_fraction_of_equal_blocks():
    assert flop_fraction(6144, 0) == 1.0
    assert flop_fraction(6144, 1024) == 7 / 12  # b = 6
    assert flop_fraction(2048, 1024) == 3 / 4
    assert flop_fraction(1000, 1024) == 1.0
    assert block_edges(10, 4) == [0, 3, 6, 10]


def test_bf16_product_in_the_inputs_dtype_stays_within_bf16_rounding_of_the_float64_sum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen).bfloat16()
    ref = x.double().T @ x.double()
    exact, cheap = torch.zeros(48, 48), torch.zeros(48, 48)
    gram_(exact, x, 16, "accumulator")
    gram_(cheap, x, 16, "input")
    mirror_(exact, 16), mirror_(cheap, 16)
    assert cheap.dtype == torch.float32
    scale = ref.abs().max()
    assert (exact.double() - ref).abs().max() / scale < 1e-6  # float32 GEMM of exact bf16 values
    err = (cheap.double() - ref).abs().max() / scale
    assert 0 < err < 2**-7  # one bf16 rounding of the batch's product
