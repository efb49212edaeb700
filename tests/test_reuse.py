"""Stored bases against the current run (issue 14, items 1-3 and 9): a subspace file, a previous fit and a
checkpoint are used only when their settings and calibration data match; otherwise re-estimated, refused or warned."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    MLP,
    SPAN,
    calibration_loader,
    span_basis,
    span_inputs,
    task_loader,
    tiny_trainer,
)
from torch.utils.data import DataLoader

from fora_lightning import FORA, ForaLoRA
from fora_lightning.metrics import leakage as relative_leakage


def _other_inputs(n: int = 128) -> torch.Tensor:
    """Calibration inputs in another span than conftest's (the 'other data')."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, SPAN, generator=gen) @ span_basis(seed=5).T


def _leak(tuned: MLP, base: MLP, x: torch.Tensor) -> float:
    """``||(W - W0) X|| / ||W0 X||`` of fc1 on ``x`` (weight_rank=0: no channel to subtract)."""
    return relative_leakage(tuned.fc1.weight - base.fc1.weight, base.fc1.weight, x)


def _fit(model: MLP, cb, steps: int = 40, **kw) -> MLP:
    tiny_trainer(max_steps=steps, callbacks=[cb], **kw).fit(model, task_loader())
    return model


def _fora(**kw) -> FORA:
    return FORA(
        **{"calibration": calibration_loader(), "target_modules": ["fc1"], "weight_rank": 0, "progress": False, **kw}
    )


# ------------------------------------------------------------------ item 1: subspace-file reuse
def test_file_made_on_other_data_is_reestimated_by_default_refused_strict_loaded_force(tmp_path, mlp):
    path = tmp_path / "s.safetensors"
    _fit(copy.deepcopy(mlp), _fora(subspaces=path), steps=1)
    other = DataLoader(_other_inputs(), batch_size=32)
    tuned = copy.deepcopy(mlp)
    with pytest.warns(
        UserWarning, match=r"FORA: .*calibration data of 'default' differs.*re-estimating and overwriting"
    ):
        _fit(tuned, _fora(calibration=other, subspaces=path))
    fresh = _leak(tuned, mlp, _other_inputs())
    with pytest.raises(ValueError, match=r"calibration data of 'default' differs.*subspaces_reuse='strict' refuses"):
        _fit(copy.deepcopy(mlp), _fora(calibration=calibration_loader(), subspaces=path, subspaces_reuse="strict"))
    forced = copy.deepcopy(mlp)
    _fit(
        forced, _fora(calibration=calibration_loader(), subspaces=path, subspaces_reuse="force")
    )  # the file is now other-data's
    stale = _leak(forced, mlp, span_inputs(300, seed=9))
    print(f"leak on the new data: re-estimated {fresh:.2e}, forced stale file {stale:.2e}")
    assert fresh < 1e-5 and stale > 0.1


@pytest.mark.parametrize(
    ("saved", "now", "named"),
    [
        ({"energy": 0.6}, {"energy": 0.999}, "energy=0.6 there, 0.999 here"),
        ({"weight_rank": 2}, {"weight_rank": 0}, "weight_rank=2 there, 0 here"),
        ({"mode": "gradient"}, {"mode": "update"}, "mode='gradient' there, 'update' here"),
        (
            {"covariance_product": "accumulator"},
            {"covariance_product": "input"},
            "covariance_product='accumulator' there, 'input' here",
        ),
    ],
)
def test_file_made_with_other_basis_settings_is_reestimated_with_a_warning(tmp_path, mlp, saved, now, named):
    path = tmp_path / "s.safetensors"
    first = _fora(subspaces=path, **saved)
    _fit(copy.deepcopy(mlp), first, steps=1)
    second = _fora(subspaces=path, **now)
    with pytest.warns(UserWarning, match=rf"FORA: .*{named}"):
        _fit(copy.deepcopy(mlp), second, steps=1)
    key = next(iter(saved))  # the file now holds the new settings: back to the old ones is refused under strict
    if key == "mode":  # Q from mode='update' serves mode='gradient' as well: no difference that way
        return
    with pytest.raises(ValueError, match=rf"{key}=.* there, .* here.*subspaces_reuse='strict' refuses it"):
        _fit(copy.deepcopy(mlp), _fora(subspaces=path, subspaces_reuse="strict", **saved), steps=1)


def test_progress_and_other_non_basis_settings_do_not_count(tmp_path, mlp, recwarn):
    path = tmp_path / "s.safetensors"
    _fit(copy.deepcopy(mlp), _fora(subspaces=path), steps=1)
    _fit(
        copy.deepcopy(mlp),
        _fora(subspaces=path, progress=True, covariance_dtype="float64", covariance_panel=3, subspaces_reuse="strict"),
        steps=1,
    )
    assert not [w for w in recwarn if "FORA:" in str(w.message)]


def test_subspaces_reuse_is_validated_at_construction():
    with pytest.raises(ValueError, match="subspaces_reuse must be 'auto', 'strict' or 'force', got 'always'"):
        FORA(subspaces_reuse="always")


# ------------------------------------------------------------------ item 2: one FORA, two fits
def test_a_reused_fora_reestimates_on_another_model_and_on_other_calibration():
    torch.manual_seed(0)
    first, second = MLP(), MLP()
    cb = _fora()
    _fit(first, cb)
    base = copy.deepcopy(second)
    with pytest.warns(UserWarning, match="FORA: FORA holds bases from a previous fit, but this is another model"):
        _fit(second, cb)
    other_model = _leak(second, base, span_inputs(300, seed=9))
    cb.calibration = DataLoader(_other_inputs(), batch_size=32)
    base = copy.deepcopy(second)
    with pytest.warns(UserWarning, match="calibration data of 'default' differs"):
        _fit(second, cb)
    other_data = _leak(second, base, _other_inputs())
    print(f"reused FORA: leak on the second model {other_model:.2e}, on the changed calibration {other_data:.2e}")
    assert other_model < 1e-5 and other_data < 1e-5


def test_a_reused_fora_keeps_its_bases_for_the_same_model_and_data(mlp):
    cb = _fora()
    _fit(mlp, cb, steps=5)
    basis = cb.subspaces["fc1"].basis.clone()
    base = copy.deepcopy(mlp)
    _fit(mlp, cb, steps=5)
    assert torch.equal(cb.subspaces["fc1"].basis, basis)
    assert _leak(mlp, base, span_inputs(300, seed=9)) < 1e-5


# ------------------------------------------------------------------ item 3: resume with changed settings
def _checkpoint(tmp_path, mlp, **kw) -> str:
    trainer = tiny_trainer(max_steps=4, callbacks=[_fora(**kw)], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(mlp, task_loader())
    return trainer.checkpoint_callback.best_model_path


@pytest.mark.parametrize(
    ("now", "named"),
    [
        ({"energy": 0.5}, "energy=0.99 there, 0.5 here"),
        ({"weight_rank": 3}, "weight_rank=0 there, 3 here"),
        ({"calibration": DataLoader(_other_inputs(), batch_size=32)}, "calibration data of 'default' differs"),
    ],
)
def test_resume_with_other_settings_or_data_is_refused_force_keeps_with_a_warning(tmp_path, mlp, now, named):
    ckpt = _checkpoint(tmp_path, mlp)
    with pytest.raises(
        ValueError, match=rf"checkpoint's FORA bases were made with other settings.*{named}.*subspaces_reuse='force'"
    ):
        tiny_trainer(max_steps=8, callbacks=[_fora(**now)]).fit(MLP(), task_loader(), ckpt_path=ckpt)
    with pytest.warns(UserWarning, match=rf"FORA: resuming with the checkpoint's FORA bases although {named}"):
        tiny_trainer(max_steps=8, callbacks=[_fora(subspaces_reuse="force", **now)]).fit(
            MLP(), task_loader(), ckpt_path=ckpt
        )


def test_gradient_mode_checkpoint_resumed_in_update_mode_is_refused(tmp_path, mlp):
    ckpt = _checkpoint(tmp_path, mlp, mode="gradient")
    for policy in ("auto", "force"):
        with pytest.raises(ValueError, match=r"no anchors W0 Q.*mode='gradient'.*W0 is not in it"):
            tiny_trainer(max_steps=8, callbacks=[_fora(subspaces_reuse=policy)]).fit(
                MLP(), task_loader(), ckpt_path=ckpt
            )


# ------------------------------------------------------------------ item 9: two callbacks in one Trainer
def test_two_fora_callbacks_on_different_layers_train_checkpoint_and_resume(tmp_path, mlp):
    base = copy.deepcopy(mlp)
    a, b = _fora(), _fora(target_modules=["fc2"])
    assert a.state_key != b.state_key
    trainer = tiny_trainer(max_steps=30, callbacks=[a, b], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(mlp, task_loader())
    assert not torch.equal(mlp.fc1.weight, base.fc1.weight) and not torch.equal(mlp.fc2.weight, base.fc2.weight)
    assert _leak(mlp, base, span_inputs(300, seed=9)) < 1e-5
    a2, b2 = _fora(), _fora(target_modules=["fc2"])
    tiny_trainer(max_steps=40, callbacks=[a2, b2]).fit(
        MLP(), task_loader(), ckpt_path=trainer.checkpoint_callback.best_model_path
    )
    for old, new in ((a, a2), (b, b2)):
        assert list(new.subspaces) == list(old.subspaces)
        assert torch.equal(
            new.subspaces[next(iter(old.subspaces))].basis.cpu(), old.subspaces[next(iter(old.subspaces))].basis.cpu()
        )


def test_a_checkpoint_under_the_bare_fora_key_still_resumes(tmp_path, mlp):
    ckpt = _checkpoint(tmp_path, mlp)
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("FORA")]
    state["callbacks"]["FORA"] = state["callbacks"].pop(key)
    torch.save(state, ckpt)
    cb = _fora()
    tiny_trainer(max_steps=8, callbacks=[cb]).fit(MLP(), task_loader(), ckpt_path=ckpt)
    assert torch.equal(cb.subspaces["fc1"].basis.cpu(), state["callbacks"]["FORA"]["layers"]["fc1"]["tensors"]["basis"])


def test_fora_with_fora_lora_and_overlapping_foras_are_refused(mlp):
    lora = ForaLoRA(calibration=calibration_loader(), target_modules=["fc2"], progress=False)
    with pytest.raises(ValueError, match="FORA and ForaLoRA are both in this Trainer"):
        tiny_trainer(max_steps=1, callbacks=[_fora(), lora]).fit(copy.deepcopy(mlp), task_loader())
    with pytest.raises(ValueError, match=r"two FORA callbacks both target \['fc1'\]"):
        tiny_trainer(max_steps=1, callbacks=[_fora(), _fora(target_modules=["fc1", "fc2"])]).fit(
            copy.deepcopy(mlp), task_loader()
        )
