"""``project_gradients=False`` (update-only, Adam-NSCL style): no ``Pi(grad)``, only ``W <- W0 + Pi(W - W0)`` after each step.

The guarantee comes from the exact post-step re-projection alone: after 200 AdamW steps with weight decay the span-input
leakage stays <= 1e-5 (float32 and bf16 projection arithmetic, an MLP and a tiny Llama), while the gradient the
optimizer sees is left unprojected.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from test_callback_llm import protected_tiny_llama

from fora_lightning import FORA, ForaConfig, ForaModule
from fora_lightning.callback import step_work
from fora_lightning.core.projection import project, right_project
from fora_lightning.core.subspace import LayerSubspace, SubspaceConfig, build_subspace, spectrum
from fora_lightning.layout import TargetLayout
from fora_lightning.lora import ForaLoRA
from fora_lightning.metrics import leakage


def _leak(sub: LayerSubspace, weight: torch.Tensor, w0: torch.Tensor, x: torch.Tensor) -> float:
    """Span-input leakage of ``D = W - W0`` less its spectral-channel part (float64)."""
    d = (weight.detach() - w0).double()
    u, v = sub.u.double(), sub.v.double()
    return leakage(d - u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T, w0, x)


def _train(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Linear],
    subs: dict[str, LayerSubspace],
    batches: list,
    loss: Callable,
    precision: str,
    project_gradients: bool,
    optimizer: Callable = lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
    steps: int = 200,
) -> None:
    """``steps`` optimizer steps with FORA's per-step work as the Callback runs it (``project_gradients`` as configured)."""
    layout = TargetLayout(targets, model)
    layout.attach_anchors(subs)
    opt = optimizer([m.weight for m in targets.values()])
    for i in range(steps):
        opt.zero_grad()
        loss(model, batches[i % len(batches)]).backward()
        if project_gradients:
            layout.project_grads(subs, precision)
        opt.step()
        layout.reproject(subs, precision)


def _mlp_subspaces(mlp: torch.nn.Module) -> tuple[dict[str, torch.nn.Linear], dict[str, torch.Tensor], dict]:
    targets = {"fc1": mlp.fc1, "fc2": mlp.fc2}
    w0 = {n: m.weight.detach().clone() for n, m in targets.items()}
    calib = torch.cat(list(calibration_loader()))
    h = torch.tanh(mlp.fc1(calib)).detach()
    cov = {"fc1": calib.T @ calib / len(calib), "fc2": h.T @ h / len(h)}
    cfg = SubspaceConfig(energy=0.999, weight_rank=2)
    return targets, w0, {n: build_subspace(n, w0[n], cfg, spectrum(cov[n])) for n in targets}


def _mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_update_only_200_adamw_steps_keep_mlp_span_leakage_below_1e5(mlp, precision):
    targets, w0, subs = _mlp_subspaces(mlp)
    _train(mlp, targets, subs, list(task_loader()), _mse, precision, project_gradients=False)
    assert float((mlp.fc1.weight.detach() - w0["fc1"]).norm() / w0["fc1"].norm()) > 0.5  # it trained
    x = span_inputs(300, seed=9)  # held out, from the calibration span
    assert _leak(subs["fc1"], mlp.fc1.weight, w0["fc1"], x) < 1e-5


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_update_only_200_adamw_steps_keep_tiny_llama_span_leakage_below_1e5(precision):
    model, names, targets, w0, held, subs, train = protected_tiny_llama()
    _train(model, targets, subs, train, lambda m, b: m.training_step(b, 0), precision, project_gradients=False)
    for n in names:
        x = held[n].double()
        x_span = x - right_project(x, subs[n].basis.double())  # held-out inputs, their part in span(Q)
        assert float((targets[n].weight.detach() - w0[n]).norm() / w0[n].norm()) > 0.05, n
        assert _leak(subs[n], targets[n].weight, w0[n], x_span) < 1e-5, n


def test_update_only_equals_update_mode_under_plain_sgd(mlp):
    """Pi is linear and W - W0 stays in S: re-projecting after an SGD step is projecting the gradient step."""
    targets, w0, subs = _mlp_subspaces(mlp)
    sgd = lambda ps: torch.optim.SGD(ps, lr=1e-2)  # noqa: E731
    batches = list(task_loader())
    state = {n: m.weight.detach().clone() for n, m in targets.items()}
    _train(mlp, targets, subs, batches, _mse, "float32", project_gradients=True, optimizer=sgd, steps=20)
    both = {n: m.weight.detach().clone() for n, m in targets.items()}
    with torch.no_grad():
        for n, m in targets.items():
            m.weight.copy_(state[n])
    _train(mlp, targets, subs, batches, _mse, "float32", project_gradients=False, optimizer=sgd, steps=20)
    for n, m in targets.items():
        assert float((both[n] - w0[n]).norm()) > 1e-2, n
        assert float((m.weight.detach() - both[n]).norm() / (both[n] - w0[n]).norm()) < 1e-4, n


class _GradResidual(pl.Callback):
    """After FORA's ``on_before_optimizer_step``: ``max ||grad - Pi(grad)|| / ||grad||`` of fc1 over the steps."""

    def __init__(self, fora: FORA) -> None:
        self.fora, self.worst = fora, 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        g, sub = pl_module.fc1.weight.grad.double(), self.fora.subspaces["fc1"]
        pi = project(g, sub.basis.double(), sub.u.double(), sub.v.double(), complement=sub.complement)
        self.worst = max(self.worst, float((g - pi).norm() / g.norm()))


@pytest.mark.parametrize("project_gradients", [True, False])
def test_callback_skips_the_gradient_projection_only_when_asked(mlp, project_gradients):
    w0 = mlp.fc1.weight.detach().clone()
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], weight_rank=2, energy=0.999,
              precision="float32", project_gradients=project_gradients, progress=False)  # fmt: skip
    seen = _GradResidual(cb)
    tiny_trainer(max_steps=30, callbacks=[cb, seen]).fit(mlp, task_loader())
    if project_gradients:
        assert seen.worst < 1e-5  # the optimizer saw Pi(grad)
    else:
        assert seen.worst > 0.1  # the optimizer saw the raw gradient
    assert float((mlp.fc1.weight.detach() - w0).norm()) > 1e-2
    assert _leak(cb.subspaces["fc1"], mlp.fc1.weight, w0, span_inputs(200, seed=9)) < 1e-5
    assert cb.state_dict()["config"]["project_gradients"] is project_gradients  # in the checkpoint
    assert ("update-only" in step_work(cb.config)) is not project_gradients  # in the fit summary


def test_project_gradients_validation():
    assert ForaConfig().project_gradients is True
    assert ForaConfig(project_gradients=False).mode == "update"
    with pytest.raises(ValueError, match="project_gradients=False .* needs mode='update'"):
        ForaConfig(mode="gradient", project_gradients=False)
    with pytest.raises(TypeError, match="project_gradients must be True or False"):
        ForaConfig(project_gradients="no")
    with pytest.raises(ValueError, match="ForaLoRA has no gradient projection"):
        ForaLoRA(project_gradients=False)
    assert "mode='gradient'" in step_work(ForaConfig(mode="gradient"))
    fora = ForaModule(MLP(), target_modules=["fc1"], project_gradients=False).configure_callbacks()[-1]
    assert isinstance(fora, FORA) and fora.config.project_gradients is False
    with pytest.raises(ValueError, match="ForaLoRA has no gradient projection"):
        ForaModule(MLP(), target_modules=["fc1"], lora_rank=4, project_gradients=False).configure_callbacks()
