"""The subspace file: round trip, what the Callback records, and one test per validation error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MLP, calibration_loader, task_loader, tiny_trainer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from fora_lightning import FORA
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.subspace_file import (
    MIN_VERSION,
    VERSION,
    FingerprintedBatches,
    load_subspaces,
    model_identity,
    read_metadata,
    save_subspaces,
    validate_against,
)


def _sub(
    d_out: int = 6, d_in: int = 5, k: int = 2, r: int = 1, complement: bool = False, seed: int = 0
) -> LayerSubspace:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=gen))
    basis = q[:, k:] if complement else q[:, :k]
    return LayerSubspace(
        d_out,
        d_in,
        k,
        basis.contiguous(),
        complement,
        u,
        torch.rand(r, generator=gen).sort(descending=True).values,
        q[:, :r].contiguous(),
        energy=0.9,
        spectrum=torch.linspace(1, 0, d_in),
    )


class Net(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 6) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, hidden)
        self.b = nn.Linear(hidden, 3)


def _rewrite_header(path, **changes) -> None:
    """Write the file again with its JSON header changed (entries set to None are removed)."""
    tensors = load_file(str(path))
    meta = read_metadata(path)
    meta.pop("upgraded_from", None)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata={"fora": json.dumps(meta)})


@pytest.fixture
def saved(tmp_path):
    net = Net()
    subs = {"a": _sub(6, 5, 2, 1), "b": _sub(3, 6, 4, 2, complement=True, seed=1)}
    path = save_subspaces(
        tmp_path / "s.safetensors",
        subs,
        {
            "model": model_identity(net),
            "capabilities": {"keep": {"tokens": 7, "weight": 1.0, "fingerprint": "sha256:x", "step": 1}},
            "chain": [],
        },
        {"a": {"capability_energy": {"keep": 0.95}}},
    )
    return path, subs, net


def test_round_trip_keeps_every_tensor_and_field(saved):
    path, subs, net = saved
    loaded, meta = load_subspaces(path)
    assert list(loaded) == ["a", "b"]
    for name, sub in subs.items():
        got = loaded[name]
        assert (got.d_out, got.d_in, got.k, got.r, got.complement, got.energy) == (
            sub.d_out,
            sub.d_in,
            sub.k,
            sub.r,
            sub.complement,
            pytest.approx(sub.energy),
        )
        for field in ("basis", "u", "s", "v", "spectrum"):
            torch.testing.assert_close(getattr(got, field), getattr(sub, field), rtol=0, atol=0)
        assert got.anchor_q is None
    assert meta["version"] == VERSION and meta["format"] == "fora-subspaces" and meta["created"]
    assert meta["layers"]["a"] == {
        "d_out": 6,
        "d_in": 5,
        "k": 2,
        "r": 1,
        "complement": False,
        "energy": pytest.approx(0.9),
        "nbytes": subs["a"].nbytes(),
        "capability_energy": {"keep": 0.95},
    }
    assert meta["model"] == model_identity(net)
    assert meta["capabilities"]["keep"]["tokens"] == 7
    validate_against(loaded, {"a": net.a, "b": net.b}, str(path), meta, model_identity(net), ["keep"])


def test_the_callback_records_model_capabilities_tokens_and_fingerprint(tmp_path, mlp):
    path = tmp_path / "mlp.safetensors"
    tiny_trainer(
        max_steps=2,
        callbacks=[
            FORA(calibration=calibration_loader(), target_modules=["fc1", "fc2"], subspaces=path, progress=False)
        ],
    ).fit(mlp, task_loader())
    meta = read_metadata(path)
    assert meta["model"]["name"] == "MLP" and meta["model"]["n_parameters"] == 4
    cap = meta["capabilities"]["default"]
    assert cap["tokens"] == 128 and cap["weight"] == 1.0 and cap["step"] == 1
    assert cap["fingerprint"] == _digest(calibration_loader())
    assert set(meta["layers"]) == {"fc1", "fc2"} and meta["layers"]["fc1"]["k"] == 5
    assert meta["config"]["energy"] == 0.99 and meta["chain"][0]["capabilities"] == ["default"]


def _digest(batches) -> str:
    fp = FingerprintedBatches(batches)
    for _ in fp:
        pass
    return fp.digest


def test_fingerprint_depends_on_the_data_not_on_batch_order():
    x = torch.arange(24.0).reshape(6, 4)
    forward, backward = list(x.split(2)), list(x.split(2))[::-1]
    assert _digest(forward) == _digest(backward)
    assert _digest(forward) != _digest([x[:2], x[2:4], x[4:] + 1])
    assert _digest([{"input_ids": x.long(), "attention_mask": torch.ones(6, 4)}]) != _digest([{"input_ids": x.long()}])
    assert len(FingerprintedBatches(DataLoader(x, batch_size=4))) == 2
    fp = FingerprintedBatches(forward)
    list(fp)
    next(iter(fp))  # a peek at the first batch (as a distributed caller does for padding) keeps the full digest
    assert fp.digest == _digest(forward)


# ---------------------------------------------------------------------------------------------- errors
def test_model_identity_ignores_fora_lora_wrappers(mlp):
    """A file written by FORA (plain linears) validates under ForaLoRA (wrapped linears) and back."""
    from fora_lightning.lora import inject_fora_lora

    plain = model_identity(mlp)
    inject_fora_lora(mlp, ["fc1", "fc2"], lora_rank=2, weight_rank=1)
    assert model_identity(mlp) == plain


def test_error_missing_and_extra_layers(saved):
    path, _, net = saved
    loaded, _ = load_subspaces(path)
    with pytest.raises(ValueError, match=r"no subspace for target layer\(s\) \['c'\]"):
        validate_against(loaded, {"a": net.a, "b": net.b, "c": nn.Linear(2, 2)}, "f")
    with pytest.raises(ValueError, match=r"targets do not include \['b'\]"):
        validate_against(loaded, {"a": net.a}, "f")


def test_error_shape_mismatch_names_layer_and_shapes(saved):
    path, _, _ = saved
    loaded, _ = load_subspaces(path)
    other = Net(d_in=7)
    with pytest.raises(ValueError, match=r"layer 'a': subspace is for a 6x5 weight, the model's is 6x7"):
        validate_against(loaded, {"a": other.a, "b": other.b}, "f")


def test_error_model_architecture_differs(saved):
    path, _, net = saved
    loaded, meta = load_subspaces(path)
    bigger = Net()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match=r"architecture differs: the file was computed on 'Net' \(4 parameter tensors.*this is 'Net' \(6",
    ):
        validate_against(loaded, {"a": bigger.a, "b": bigger.b}, "f", meta, model_identity(bigger))


def test_error_hf_config_differs_names_the_entries(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(layers: int, heads: int) -> LlamaForCausalLM:
        cfg = LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
        )
        return LlamaForCausalLM(cfg)

    saved_model, other = tiny(1, 2), tiny(1, 4)
    targets = {n: m for n, m in saved_model.named_modules() if n.endswith("up_proj")}
    subs = {n: _sub(m.out_features, m.in_features, 2, 1) for n, m in targets.items()}
    path = save_subspaces(tmp_path / "llama.safetensors", subs, {"model": model_identity(saved_model)})
    loaded, meta = load_subspaces(path)
    assert meta["model"]["name"] == "llama" and meta["model"]["config"]["num_attention_heads"] == 2
    other_targets = {n: m for n, m in other.named_modules() if n.endswith("up_proj")}
    with pytest.raises(ValueError, match=r"model config differs.*num_attention_heads=2 in the file, 4 here"):
        validate_against(loaded, other_targets, str(path), meta, model_identity(other))
    validate_against(loaded, targets, str(path), meta, model_identity(tiny(1, 2)))  # same config, new weights: fine


def test_error_configured_capability_not_in_file(saved):
    path, _, net = saved
    loaded, meta = load_subspaces(path)
    with pytest.raises(
        ValueError,
        match=r"configured to keep capabilities \['keep', 'math'\], the file protects \['keep'\] \(not \['math'\]\)",
    ):
        validate_against(loaded, {"a": net.a, "b": net.b}, "f", meta, model_identity(net), ["keep", "math"])


def test_error_newer_format_version_says_which_version_is_needed(saved):
    path, _, _ = saved
    _rewrite_header(path, version=VERSION + 1)
    with pytest.raises(
        ValueError,
        match=rf"format version {VERSION + 1}.*reads versions {MIN_VERSION}-{VERSION}.*supports format version {VERSION + 1}",
    ):
        read_metadata(path)


def test_error_older_unsupported_version_is_refused_with_the_needed_version(saved):
    path, _, _ = saved
    _rewrite_header(path, version=0)
    with pytest.raises(
        ValueError, match=rf"format version 0.*needs format version {MIN_VERSION}-{VERSION}.*re-estimate"
    ):
        read_metadata(path)


def test_version_1_file_is_read_and_model_check_is_skipped_with_a_warning(saved):
    path, _, net = saved
    _rewrite_header(path, version=1, model=None, capabilities=None, chain=None)
    loaded, meta = load_subspaces(path)
    assert meta["upgraded_from"] == 1 and meta["model"] is None and meta["capabilities"] == {}
    with pytest.warns(UserWarning, match="format version 1, which records no model"):
        validate_against(loaded, {"a": net.a, "b": net.b}, "f", meta, model_identity(net))


def test_error_not_a_fora_file_and_wrong_format(tmp_path, saved):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a FORA subspace file"):
        read_metadata(plain)
    path, _, _ = saved
    _rewrite_header(path, format="something-else")
    with pytest.raises(ValueError, match="format 'something-else', expected 'fora-subspaces'"):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="subspace file not found"):
        read_metadata(tmp_path / "nope.safetensors")


def test_error_missing_tensor_and_inconsistent_shape(saved):
    path, _, _ = saved
    tensors = load_file(str(path))
    meta = read_metadata(path)
    del tensors["a::u"]
    tensors["b::basis"] = tensors["b::basis"][:, :1].contiguous()
    save_file(tensors, str(path), metadata={"fora": json.dumps(meta)})
    with pytest.raises(
        ValueError,
        match=r"layer 'a': tensor 'a::u' is missing; layer 'b': 'basis' is \(6, 1\), the header implies \(6, 2\)",
    ):
        load_subspaces(path)


def test_error_k_larger_than_d_in(saved):
    path, _, _ = saved
    meta = read_metadata(path)
    meta["layers"]["a"]["k"] = 9
    _rewrite_header(path, layers=meta["layers"])
    with pytest.raises(ValueError, match=r"layer 'a': k=9, r=1 do not fit a 6x5 weight"):
        load_subspaces(path)


def test_callback_refuses_a_file_from_another_model(tmp_path, mlp):
    path = tmp_path / "net.safetensors"
    other = MLP()
    other.extra = nn.Linear(2, 2)
    subs = {"fc1": _sub(24, 16, 5, 2), "fc2": _sub(8, 24, 3, 2)}
    save_subspaces(path, subs, {"model": model_identity(other)})
    fora = FORA(target_modules=["fc1", "fc2"], subspaces=path, progress=False)
    with pytest.raises(ValueError, match="architecture differs"):
        tiny_trainer(max_steps=1, callbacks=[fora]).fit(mlp, task_loader())
