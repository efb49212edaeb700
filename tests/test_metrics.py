"""Preservation metrics against hand-computed values, plus one 2-process gloo sync."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fora_lightning.metrics import CausalPerplexity, ExactMatch, LayerLeakage, TokenKL, leakage


def test_layer_leakage_hand_values_and_mask():
    metric = LayerLeakage(["a", "b"])
    w0 = torch.eye(2)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # D = diag(0, 1)
    metric.update("a", torch.eye(2), w, w0)  # ||X D^T||^2 = 1, ||X W0^T||^2 = 2
    # layer b: the padded third position (huge, along the changed direction) must be skipped
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [0.0, 1e6]]])
    metric.update("b", x, w, w0, mask=torch.tensor([[1, 1, 0]]))  # ||D X||^2 = 1, ||W0 X||^2 = 10
    got = metric.as_dict()
    assert got["a"] == pytest.approx(math.sqrt(1 / 2))
    assert got["b"] == pytest.approx(math.sqrt(1 / 10))
    # streaming over two batches pools the squared norms, not the ratios
    metric.update("a", torch.tensor([[3.0, 0.0]]), w, w0)  # adds 0 and 9
    assert metric.as_dict()["a"] == pytest.approx(math.sqrt(1 / 11))


def test_leakage_of_one_layer_hand_values_and_mask():
    w0 = torch.eye(2)
    delta = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert leakage(delta, w0, torch.eye(2)) == pytest.approx(math.sqrt(1 / 2))
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [0.0, 1e6]]])
    assert leakage(delta, w0, x, mask=torch.tensor([[1, 1, 0]])) == pytest.approx(math.sqrt(1 / 10))
    assert leakage(delta, w0, x) > 0.99  # unmasked, the huge padded row dominates


def test_layer_leakage_probe_matches_dense_formula():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(0.1 * torch.randn(3, 5))
    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    metric = LayerLeakage(["lin"])
    with metric.probe({"lin": lin}, {"lin": w0}) as probe, probe.batch(mask):
        lin(x)
    kept = x[mask.bool()].double()
    expected = float((kept @ (lin.weight.detach() - w0).double().T).norm() / (kept @ w0.double().T).norm())
    assert metric.as_dict()["lin"] == pytest.approx(expected, rel=1e-10)
    assert not lin._forward_pre_hooks  # hooks removed on exit


def test_token_kl_hand_value_masked():
    base = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    tuned = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    metric = TokenKL()
    metric.update(base, tuned, torch.tensor([[1, 0]]))  # second position is padding
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    metric.update(base[:, :1], base[:, :1])  # a zero-KL token halves the mean
    assert metric.compute().item() == pytest.approx(expected / 2, rel=1e-6)


def test_causal_perplexity_shifts_and_masks():
    probs = torch.tensor(
        [
            [[0.5, 0.5], [0.2, 0.8], [0.3, 0.7]],  # scores token 1 (p=.5), token 1 (p=.8); last logit unused
            [[0.1, 0.9], [0.6, 0.4], [0.5, 0.5]],  # scores token 1 (p=.9); then padding
        ]
    )
    ids = torch.tensor([[0, 1, 1], [0, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    metric = CausalPerplexity()
    metric.update(probs.log(), ids, mask)
    expected = math.exp(-(math.log(0.5) + math.log(0.8) + math.log(0.9)) / 3)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)
    # labels with -100 exclude the prompt token: only the second target of row 0 and none of row 1
    metric = CausalPerplexity()
    metric.update(probs.log(), ids, mask, labels=torch.tensor([[0, -100, 1], [0, -100, 0]]))
    assert metric.compute().item() == pytest.approx(1 / 0.8, rel=1e-5)


def test_exact_match_normalises_whitespace_only():
    metric = ExactMatch()
    metric.update(["jump  twice ", "walk", "Look"], ["jump twice", "run", "look"])
    assert metric.compute().item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metric.update(["a", "b"], ["a"])


def _rank_logits(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and tuned logits of one rank; ranks see different token counts (3 and 5), so a mean of
    the ranks' means would differ from the pooled mean."""
    gen = torch.Generator().manual_seed(rank)
    n = 3 + 2 * rank
    return torch.randn(1, n, 4, generator=gen), torch.randn(1, n, 4, generator=gen)


def _pooled_kl() -> float:
    (b0, t0), (b1, t1) = _rank_logits(0), _rank_logits(1)
    pooled = TokenKL()
    pooled.update(torch.cat([b0, b1], 1), torch.cat([t0, t1], 1))
    return pooled.compute().item()


def test_token_kl_reduces_sum_states_across_ranks():
    """torchmetrics' sync path with a stand-in gather that returns rank 1's states (no processes)."""
    other = TokenKL()
    other.update(*_rank_logits(1))
    states = iter([getattr(other, name) for name in other._reductions])
    synced = TokenKL(dist_sync_fn=lambda t, group=None: [t, next(states)], distributed_available_fn=lambda: True)
    synced.update(*_rank_logits(0))
    assert synced.compute().item() == pytest.approx(_pooled_kl(), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kl_rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = TokenKL()
        metric.update(*_rank_logits(rank))
        queue.put((rank, metric.compute().item()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters re-import torch: ~30 s on 2 busy cores
def test_token_kl_syncs_over_two_gloo_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_kl_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    results = dict(queue.get(timeout=5) for _ in range(2))
    assert results[0] == pytest.approx(_pooled_kl(), rel=1e-6)
    assert results[1] == pytest.approx(results[0], rel=1e-12)
