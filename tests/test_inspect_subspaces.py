"""fora-inspect: the table from the file alone, overlap against a dense reference, the plots."""

from __future__ import annotations

import sys

import pytest
import torch

from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.subspace_file import save_subspaces
from fora_lightning.inspect_subspaces import _grid_position, layer_report, main


def _file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    subs = {}
    for block in range(2):
        for role, (d_out, d_in, k) in {"self_attn.q_proj": (8, 12, 3), "mlp.down_proj": (12, 16, 10)}.items():
            w = torch.randn(d_out, d_in, generator=gen)
            u, s, vh = torch.linalg.svd(w)
            evals, evecs = torch.linalg.eigh(torch.cov(torch.randn(d_in, 50, generator=gen)))
            subs[f"model.layers.{block}.{role}"] = LayerSubspace(
                d_out,
                d_in,
                k,
                evecs.flip(1)[:, :k].contiguous(),
                False,
                u[:, :2].contiguous(),
                s[:2].contiguous(),
                vh[:2].T.contiguous(),
                energy=0.8,
                spectrum=evals.flip(0),
            )
    path = save_subspaces(
        tmp_path / "demo.safetensors",
        subs,
        {"capabilities": {"translation": {"tokens": 1234, "weight": 1.0, "fingerprint": "sha256:ab", "step": 1}}},
    )
    return path, subs


def test_layer_report_overlap_matches_dense_principal_angles(tmp_path):
    _, subs = _file(tmp_path)
    sub = subs["model.layers.0.self_attn.q_proj"]
    row = layer_report("x", sub)
    cos = torch.linalg.svdvals(sub.basis.double().T @ sub.v.double())
    assert row["overlap"] == pytest.approx(float((cos**2).sum() / 2), abs=1e-6)
    assert row["angle_min"] == pytest.approx(float(torch.rad2deg(torch.arccos(cos.max().clamp(max=1)))), abs=1e-3)
    assert row["chance"] == pytest.approx(3 / 12)
    assert row["fit_bytes"] == sub.nbytes() + 4 * (8 * 3 + 2 * 12)


def test_inspect_prints_the_table_and_writes_plots(tmp_path, capsys):
    path, subs = _file(tmp_path)
    assert (
        main(["--subspaces", str(path), "--out", str(tmp_path / "out" / "inspect"), "--json", str(tmp_path / "t.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "capability 'translation': 1,234 tokens" in out
    for name in subs:
        assert name in out
    line = next(row for row in out.splitlines() if row.startswith("model.layers.1.mlp.down_proj"))
    assert "16x16" not in line and "12x16" in line and " 10 " in line
    for suffix in ("spectra", "heatmap"):
        png = tmp_path / "out" / f"inspect_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "t.json").stat().st_size > 0


def test_inspect_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    path, _ = _file(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        main(["--subspaces", str(path)])
    assert "pip install 'fora-lightning[plot]'" in capsys.readouterr().err
    assert main(["--subspaces", str(path), "--no-plots"]) == 0


def test_grid_position_splits_block_and_role():
    assert _grid_position("model.layers.13.mlp.up_proj") == ("model.layers.13", "mlp.up_proj")
    assert _grid_position("fc1") == ("-", "fc1")
