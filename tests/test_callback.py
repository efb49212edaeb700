"""The FORA Callback end to end: the guarantee, resume, hooks, freezing and errors."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from torch.utils.data import DataLoader

from fora_lightning import FORA
from fora_lightning.core.subspace import SubspaceConfig, estimate_subspaces
from fora_lightning.core.subspace_file import save_subspaces
from fora_lightning.metrics import leakage
from fora_lightning.reuse import VERIFY_BATCHES


def _leak_outside_channel(cb: FORA, name: str, tuned: torch.nn.Linear, base: torch.nn.Linear, x: torch.Tensor) -> float:
    sub = cb.subspaces[name]
    d = (tuned.weight.detach() - base.weight.detach()).double()
    u, v = sub.u.double(), sub.v.double()
    channel = u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
    return leakage(d - channel, base.weight, x)


def _fit(model, callbacks=(), steps=150, **kw):
    tiny_trainer(max_steps=steps, callbacks=list(callbacks), **kw).fit(model, task_loader())
    return model


def test_update_mode_keeps_span_inputs_exact_while_plain_ft_moves_them(mlp):
    base = copy.deepcopy(mlp)
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], weight_rank=2, energy=0.999, progress=False)
    _fit(mlp, [cb])
    x = span_inputs(300, seed=9)  # held-out inputs from the calibration span
    leak = _leak_outside_channel(cb, "fc1", mlp.fc1, base.fc1, x)
    moved = float((mlp.fc1.weight - base.fc1.weight).norm() / base.fc1.weight.norm())
    plain = _fit(copy.deepcopy(base))
    plain_leak = leakage(plain.fc1.weight - base.fc1.weight, base.fc1.weight, x)
    assert cb.subspaces["fc1"].k == 5  # the span's dimension
    assert moved > 0.5  # the weights really moved (off the span)
    assert leak < 1e-5
    assert plain_leak > 1e3 * max(leak, 1e-9) and plain_leak > 0.1


def test_gradient_mode_with_adamw_leaks(mlp):
    base = copy.deepcopy(mlp)
    cb = FORA(
        calibration=calibration_loader(),
        target_modules=["fc1"],
        weight_rank=2,
        energy=0.999,
        mode="gradient",
        progress=False,
    )
    _fit(mlp, [cb])
    leak = _leak_outside_channel(cb, "fc1", mlp.fc1, base.fc1, span_inputs(300, seed=9))
    assert leak > 1e-3  # Adam's per-coordinate scaling and decoupled weight decay leave the feasible set


def test_freeze_other_freezes_everything_but_target_weights(mlp):
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], progress=False)
    before = copy.deepcopy(mlp)
    _fit(mlp, [cb], steps=5)
    assert [n for n, p in mlp.named_parameters() if p.requires_grad] == ["fc1.weight"]
    torch.testing.assert_close(mlp.fc2.weight, before.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(mlp.fc1.bias, before.fc1.bias, rtol=0, atol=0)


class CountingLoader:
    """A calibration loader that counts the batches drawn from it."""

    def __init__(self, batch_size: int = 32) -> None:
        self.loader = calibration_loader(batch_size=batch_size)
        self.drawn = 0

    def __iter__(self):
        for batch in self.loader:
            self.drawn += 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def test_resume_restores_bases_without_calibration(tmp_path, mlp):
    cal = CountingLoader()
    cb = FORA(calibration=cal, target_modules=["fc1", "fc2"], weight_rank=2, progress=False)
    trainer = tiny_trainer(max_steps=6, callbacks=[cb], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(mlp, task_loader())
    assert cal.drawn == len(cal)  # the leakage sentinel probes the calibration hold-out slice: no extra batch
    ckpt = trainer.checkpoint_callback.best_model_path
    cal2 = CountingLoader(batch_size=8)  # the same samples, grouped otherwise: the same data
    cb2 = FORA(calibration=cal2, target_modules=["fc1", "fc2"], weight_rank=2, progress=False)
    trainer2 = tiny_trainer(max_steps=12, callbacks=[cb2], default_root_dir=tmp_path)
    trainer2.fit(MLP(), task_loader(), ckpt_path=ckpt)
    # no calibration pass: one data-only fingerprint pass and the first VERIFY_BATCHES of the captured-energy check
    assert cal2.drawn == len(cal2) + VERIFY_BATCHES
    assert trainer2.global_step == 12
    for name, sub in cb.subspaces.items():
        for field, t in sub.tensors().items():
            if field != "delta":  # the channel's running coordinate moved on in the 6 resumed steps
                assert torch.equal(t.cpu(), getattr(cb2.subspaces[name], field).cpu()), (name, field)


@pytest.mark.parametrize("reprojection", ["anchors", "step"])
def test_second_fit_does_not_stack_hooks(mlp, reprojection, monkeypatch):
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], progress=False, reprojection=reprojection)
    calls = []
    if reprojection == "anchors":
        original = cb._after_optimizer_step

        def counting(*args):
            calls.append(1)
            return original(*args)

        cb._after_optimizer_step = counting
    else:
        from fora_lightning.layout import _LayerStep

        original = _LayerStep.after

        def counting(self, before):
            calls.append(1)
            return original(self, before)

        monkeypatch.setattr(_LayerStep, "after", counting)
    _fit(mlp, [cb], steps=3)
    _fit(mlp, [cb], steps=3)
    assert len(calls) == 6
    assert "step" not in mlp.configure_optimizers.__self__.trainer.optimizers[0].__dict__  # the wrapper is removed


def test_subspace_file_is_saved_then_loaded(tmp_path, mlp):
    path = tmp_path / "subspaces.safetensors"
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], subspaces=path, progress=False)
    _fit(copy.deepcopy(mlp), [cb], steps=1)
    assert path.is_file()
    cal = CountingLoader(batch_size=8)
    cb2 = FORA(calibration=cal, target_modules=["fc1"], subspaces=path, progress=False)
    _fit(copy.deepcopy(mlp), [cb2], steps=1)
    assert (
        cal.drawn == len(cal) + VERIFY_BATCHES + 1
    )  # loaded: a fingerprint pass, the energy check and the sentinel's probe batch (monitor.calibration_slice), no calibration
    torch.testing.assert_close(cb2.subspaces["fc1"].basis, cb.subspaces["fc1"].basis)


def test_loaded_subspaces_that_do_not_match_the_model_are_refused(tmp_path, mlp):
    path = tmp_path / "wrong.safetensors"
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], progress=False)
    _fit(copy.deepcopy(mlp), [cb], steps=1)
    sub = cb.subspaces["fc1"]
    save_subspaces(path, {"fc2": sub})
    with pytest.raises(ValueError, match=r"no subspace for target layer\(s\) \['fc1'\].*'fc2'"):
        _fit(copy.deepcopy(mlp), [FORA(target_modules=["fc1"], subspaces=path, progress=False)], steps=1)
    other = estimate_subspaces({"fc1": torch.randn(7, 16)}, SubspaceConfig(source="weights", rank=3, weight_rank=2))
    save_subspaces(path, other)
    with pytest.raises(ValueError, match="layer 'fc1': subspace is for a 7x16 weight, the model's is 24x16"):
        _fit(copy.deepcopy(mlp), [FORA(target_modules=["fc1"], subspaces=path, progress=False)], steps=1)


def test_bad_inputs_raise_documented_errors(mlp):
    with pytest.raises(ValueError, match="calibration loader is empty"):
        _fit(
            copy.deepcopy(mlp),
            [FORA(calibration=DataLoader(torch.empty(0, 16)), target_modules=["fc1"], progress=False)],
            steps=1,
        )
    nan = DataLoader(torch.full((4, 16), float("nan")), batch_size=2)
    with pytest.raises(ValueError, match=r"non-finite.*\['fc1'\]"):
        _fit(copy.deepcopy(mlp), [FORA(calibration=nan, target_modules=["fc1"], progress=False)], steps=1)
    with pytest.raises(ValueError, match="matched no module of MLP. Linear layers available"):
        _fit(copy.deepcopy(mlp), [FORA(calibration=calibration_loader(), target_modules=["q_proj"])], steps=1)
    with pytest.raises(
        ValueError, match=r"found no calibration data.*trainer.datamodule.calibration_dataloader\(\) \(no datamodule\)"
    ):
        _fit(copy.deepcopy(mlp), [FORA(target_modules=["fc1"], progress=False)], steps=1)
    with pytest.raises(ValueError, match="mode must be 'update' or 'gradient'"):
        FORA(target_modules=["fc1"], mode="weights")


def test_rank_above_dimension_is_clamped_and_warned(mlp):
    cb = FORA(calibration=calibration_loader(), target_modules=["fc1"], rank=40, progress=False)
    with pytest.warns(UserWarning, match="rank=40 exceeds d_in=16 for layer 'fc1'; clamped to 16"):
        _fit(mlp, [cb], steps=1)
    assert cb.subspaces["fc1"].k == 16


def test_calibration_step_and_datamodule_calibration_are_used(mlp):
    seen = []

    class WithStep(MLP):
        def calibration_step(self, batch):
            seen.append(batch.shape)
            return self(batch)

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return task_loader()

        def calibration_dataloader(self):
            return calibration_loader(n=64)

    model = WithStep()
    cb = FORA(target_modules=["fc1"], progress=False)
    tiny_trainer(max_steps=1, callbacks=[cb]).fit(model, datamodule=DM())
    assert seen == [torch.Size([32, 16])] * 3  # two calibration batches, then the leakage sentinel's probe batch
