"""L2-SP and EWC against closed forms: constant task gradient, plain SGD, hand-derived Fisher."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fora_lightning.baselines import TrainTargetsOnly
from fora_lightning.baselines.ewc import EWC
from fora_lightning.baselines.l2sp import L2SP

V, D, LR, STEPS = 5, 3, 0.1, 4


class TinyLM(pl.LightningModule):
    """Frozen-able embedding + linear ``head``; the task loss is ``sum(C * head.weight)`` (gradient C)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.register_buffer("c", torch.randn(V, D))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))

    def training_step(self, batch, batch_idx):
        return (self.c * self.head.weight).sum() + 0 * self.emb.weight.sum() * self.emb.weight.requires_grad

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def _fit(module: TinyLM, callback) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, DataLoader(range(STEPS), batch_size=1))


def _sgd_closed_form(c: torch.Tensor, weight: torch.Tensor | float, lam: float) -> torch.Tensor:
    """``D_{t+1} = D_t - lr (C + 2 lam F D_t)`` from ``D_0 = 0``."""
    d = torch.zeros_like(c)
    for _ in range(STEPS):
        d = d - LR * (c + 2 * lam * weight * d)
    return d


def test_l2sp_adds_exact_penalty_gradient_and_freezes_the_rest():
    module = TinyLM()
    w0, emb0 = module.head.weight.detach().clone(), module.emb.weight.detach().clone()
    _fit(module, L2SP(lambda_=0.7, target_modules=["head"]))
    torch.testing.assert_close(module.head.weight.detach() - w0, _sgd_closed_form(module.c, 1.0, 0.7))
    assert torch.equal(module.emb.weight, emb0) and not module.emb.weight.requires_grad


def test_plain_targets_only_is_unpenalised():
    module = TinyLM()
    w0 = module.head.weight.detach().clone()
    _fit(module, TrainTargetsOnly(target_modules=["head"]))
    torch.testing.assert_close(module.head.weight.detach() - w0, _sgd_closed_form(module.c, 1.0, 0.0))


def _calibration() -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor([[1, 2, 3, 4], [4, 0, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the second row's last token is padding
    return [{"input_ids": ids, "attention_mask": mask}]


def _empirical_fisher_by_hand(module: TinyLM) -> torch.Tensor:
    """Softmax head: d log p(y|h)/dW = (e_y - p) h^T; per sequence the mean over its positions."""
    batch = _calibration()[0]
    total = torch.zeros(V, D)
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            g = torch.zeros(V, D)
            for t in range(n - 1):
                h = module.emb.weight[ids[t]]
                p = torch.softmax(module.head.weight @ h, 0)
                g += torch.outer(nn.functional.one_hot(ids[t + 1], V).float() - p, h)
            total += (g / (n - 1)) ** 2
    f = total / 2
    return f / f.mean()


def test_ewc_empirical_fisher_matches_hand_formula_and_weights_the_pull():
    module = TinyLM()
    w0 = module.head.weight.detach().clone()
    expected_f = _empirical_fisher_by_hand(module)
    cb = EWC(calibration=_calibration(), lambda_=0.3, target_modules=["head"], fisher="empirical", progress=False)
    _fit(module, cb)
    torch.testing.assert_close(cb.fisher["head"], expected_f, rtol=1e-5, atol=1e-6)
    assert cb.fisher["head"].mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(module.head.weight.detach() - w0, _sgd_closed_form(module.c, expected_f, 0.3))


def test_ewc_sampled_fisher_is_seeded_and_differs_from_empirical():
    def fisher(kind: str, seed: int) -> torch.Tensor:
        cb = EWC(calibration=_calibration(), target_modules=["head"], fisher=kind, seed=seed, progress=False)
        _fit(TinyLM(), cb)
        return cb.fisher["head"]

    sampled = fisher("sampled", 0)
    torch.testing.assert_close(sampled, fisher("sampled", 0))
    assert not torch.allclose(sampled, fisher("empirical", 0))
    assert not torch.allclose(sampled, fisher("sampled", 1))


def test_ewc_state_round_trip_and_argument_errors():
    cb = EWC(calibration=_calibration(), target_modules=["head"], progress=False)
    _fit(TinyLM(), cb)
    restored = EWC(target_modules=["head"])
    restored.load_state_dict(cb.state_dict())
    torch.testing.assert_close(restored.fisher["head"], cb.fisher["head"])
    torch.testing.assert_close(restored.anchors["head"], cb.anchors["head"])
    with pytest.raises(ValueError, match="fisher must be"):
        EWC(fisher="true")
    with pytest.raises(ValueError, match="lambda_"):
        L2SP(lambda_=-1.0)
