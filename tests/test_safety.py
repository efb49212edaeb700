"""Settings and inputs that would train silently wrong (issue 14, items 4-8 and 10): each ends in an error
or a ``FORA:`` warning naming the layer, the value and the fix."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLP, calibration_loader, span_inputs, task_loader, tiny_trainer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from fora_lightning import FORA
from fora_lightning.core.subspace_file import load_subspaces
from fora_lightning.inspect_subspaces import main as inspect_main


def _fora(**kw) -> FORA:
    return FORA(**{"calibration": calibration_loader(), "target_modules": ["fc1"], "progress": False, **kw})


def _fit(model: pl.LightningModule, cb: FORA, steps: int = 2, loader: DataLoader | None = None) -> None:
    tiny_trainer(max_steps=steps, callbacks=[cb]).fit(model, loader or task_loader())


# ------------------------------------------------------------------ item 4: corrupt subspace files
def _corrupt(path, field: str, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[f"fc1::{field}"] = edit(tensors[f"fc1::{field}"])
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("field", "edit", "message"),
    [
        ("basis", lambda t: t * float("nan"), r"layer 'fc1': \['basis'\] hold NaN or inf"),
        ("basis", lambda t: 2 * t, r"layer 'fc1': 'basis' columns are not orthonormal"),
        ("u", lambda t: t + 0.5, r"layer 'fc1': 'u' columns are not orthonormal"),
        ("s", lambda t: t.flip(0), r"layer 'fc1': singular values 's' are not non-negative and descending"),
    ],
)
def test_a_corrupt_subspace_file_is_refused_on_load_by_fit_and_by_inspect(tmp_path, mlp, capsys, field, edit, message):
    path = tmp_path / "s.safetensors"
    _fit(copy.deepcopy(mlp), _fora(subspaces=path, weight_rank=3), steps=1)
    load_subspaces(path)  # the written file is valid
    _corrupt(path, field, edit)
    with pytest.raises(ValueError, match=rf"{path.name} is inconsistent: {message}"):
        load_subspaces(path)
    with pytest.raises(ValueError, match=message):
        _fit(copy.deepcopy(mlp), _fora(subspaces=path, weight_rank=3), steps=1)
    with pytest.raises(SystemExit):
        inspect_main(["--subspaces", str(path), "--no-plots"])
    assert "fc1" in capsys.readouterr().err


# ------------------------------------------------------------------ item 5: layers with k = 0 or k = d_in
@pytest.mark.parametrize("settings", [{"energy": 1.0}, {"rank": 16}])
def test_a_layer_frozen_entirely_is_warned(mlp, settings):
    full_rank = DataLoader(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)), batch_size=16)
    with pytest.warns(UserWarning, match=r"FORA: FORA layers \['fc1'\] keep k = d_in"):
        _fit(mlp, _fora(calibration=full_rank, **settings), steps=1)


# ------------------------------------------------------------------ item 6: tied weights
def test_protecting_a_tied_lm_head_is_refused():
    from tiny_lm import tiny_llama_config
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tied(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(LlamaConfig(**{**tiny_llama_config(), "tie_word_embeddings": True}))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tied()
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    ids = DataLoader(torch.randint(3, 20, (8, 6)), batch_size=4)
    cb = FORA(calibration=ids, target_modules=["lm_head"], progress=False)
    with pytest.raises(
        ValueError,
        match=r"'model.lm_head.weight' is the same tensor as \['model.model.embed_tokens.weight'\].*tie_word_embeddings",
    ):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(
            module, DataLoader(torch.utils.data.TensorDataset(ids.dataset), batch_size=4)
        )


# ------------------------------------------------------------------ item 7: settings that train outside the protected set
def test_freeze_other_false_warns_at_fit_start(mlp):
    with pytest.warns(
        UserWarning, match=r"FORA: freeze_other=False: 3 non-target parameter tensors .* train unprotected"
    ):
        _fit(mlp, _fora(freeze_other=False), steps=1)


@pytest.mark.parametrize(
    ("optimizer", "why"),
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), "AdamW rescales each coordinate"),
        (lambda p: torch.optim.SGD(p, lr=1e-2, weight_decay=0.1), "weight decay pulls W"),
    ],
)
def test_gradient_mode_with_adaptive_optimizer_or_weight_decay_warns(optimizer, why):
    class Model(MLP):
        def configure_optimizers(self):
            return optimizer(self.parameters())

    with pytest.warns(UserWarning, match=rf"FORA: FORA mode='gradient' with {why}"):
        _fit(Model(), _fora(mode="gradient"), steps=1)


def test_gradient_mode_with_plain_sgd_does_not_warn(recwarn):
    class Model(MLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    _fit(Model(), _fora(mode="gradient"), steps=1)
    assert not [w for w in recwarn if "FORA: FORA mode='gradient'" in str(w.message)]


# ------------------------------------------------------------------ item 8: targets whose forward never runs
def test_a_target_never_called_in_calibration_is_named():
    class Attention(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

        def training_step(self, batch, batch_idx):
            return self(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(
        ValueError, match=r"ran 2 batches, but the forward pass never reached target layer\(s\) \['attn.out_proj'\]"
    ):
        cal = DataLoader(torch.randn(8, 3, 16), batch_size=4)
        _fit(
            Attention(),
            _fora(calibration=cal, target_modules=["out_proj"]),
            loader=DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 16))),
        )


# ------------------------------------------------------------------ item 10: misleading errors
def test_finite_huge_inputs_say_accumulator_overflow_and_float64_works(mlp):
    huge = DataLoader(1e20 * span_inputs(64, seed=2), batch_size=32)
    with pytest.raises(
        ValueError,
        match=r"inputs of layer\(s\) \['fc1'\] are finite, but their float32 covariance accumulator overflowed.*covariance_dtype='float64'",
    ):
        _fit(copy.deepcopy(mlp), _fora(calibration=huge), steps=1)
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) inputs reached layer\(s\) \['fc1'\]"):
        _fit(
            copy.deepcopy(mlp), _fora(calibration=DataLoader(torch.full((8, 16), float("inf")), batch_size=4)), steps=1
        )
    cb = _fora(calibration=huge, covariance_dtype="float64")
    _fit(mlp, cb, steps=1)
    assert cb.subspaces["fc1"].k == 5


def test_a_directory_as_subspaces_fails_before_calibration_and_leaves_no_tmp(tmp_path, mlp):
    class Counting:
        drawn = 0

        def __iter__(self):
            for batch in calibration_loader():
                Counting.drawn += 1
                yield batch

    with pytest.raises(
        IsADirectoryError, match=r"subspaces=.* is a directory; give a file path such as .*subspaces.safetensors"
    ):
        _fit(mlp, _fora(calibration=Counting(), subspaces=tmp_path))
    assert Counting.drawn == 0 and list(tmp_path.iterdir()) == []


def test_a_training_loader_as_calibration_explains_how_batches_reach_the_model(mlp):
    with pytest.raises(
        TypeError,
        match=r"forward rejected a calibration batch .*module\(\*batch\) for a tuple/list.*this one is a list of 2.*calibration_step",
    ):
        _fit(mlp, _fora(calibration=task_loader()))


def test_a_plain_string_target_is_a_full_match_regex_and_the_error_says_so(mlp):
    with pytest.raises(
        ValueError,
        match=r"matched no module of MLP\. A single string is a regular expression .*re\.fullmatch.*\['fc'\]",
    ):
        _fit(mlp, _fora(target_modules="fc"))
