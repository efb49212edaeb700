"""benchmarks/qwen3_train_step.py (the GPU session's whole-model run) end to end on a tiny Qwen3, and its leakage
measure against a dense float64 reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qwen3_train_step.py"
_spec = importlib.util.spec_from_file_location("qwen3_train_step", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["--tiny", "--device", "cpu", "--seq", "32", "--calib-seqs", "4", "--held-tokens", "32"]


def test_tiny_run_writes_every_variant_and_fora_holds(tmp_path: Path) -> None:
    payload = bench.main([*TINY, "--steps", "3", "--plain-steps", "2", "--warmup", "1", "--out-dir", str(tmp_path)])
    runs = payload["runs"]
    assert list(runs) == ["plain", "fora", "plain_targets"]
    assert all("error" not in r for r in runs.values()), {k: r.get("error") for k, r in runs.items()}
    fora = runs["fora"]
    assert [r["steps_done"] for r in runs.values()] == [2, 3, 2]
    assert len(fora["step_s"]) == 3 and fora["median_step_s"] > 0
    # freeze_other (a default): FORA trains its targets only, the same set as the last plain run
    assert fora["trainable_params"] == fora["protected_params"] == runs["plain_targets"]["trainable_params"]
    assert runs["plain"]["trainable_params"] == runs["plain"]["model_params"] > fora["trainable_params"]
    assert len(fora["leakage_per_layer"]) == 14  # 2 blocks x 7 projections
    assert 0 < fora["leakage_max"] <= fora["channel_bound"] + 1e-4  # the channel moves, within its bound
    assert fora["leakage_no_channel_max"] < 1e-4
    assert fora["fora_state"]["bytes"] > 0 and fora["fora_state"]["host_bytes"] == 0
    md = (tmp_path / "qwen3_train_step_cpu.md").read_text()
    assert "| FORA, every default |" in md and "Command: `python benchmarks/qwen3_train_step.py --tiny" in md
    assert (tmp_path / "qwen3_train_step_cpu.json").exists()


def test_time_budget_stops_fora_at_a_step_and_still_reports_leakage(tmp_path: Path) -> None:
    payload = bench.main(
        [
            *TINY,
            "--steps",
            "50",
            "--plain-steps",
            "1",
            "--time-budget",
            "0",
            "--reserve",
            "0",
            "--out-dir",
            str(tmp_path),
        ]
    )
    runs = payload["runs"]
    assert list(runs) == ["plain", "fora"]  # no time left for the third run
    assert runs["plain"]["steps_done"] == 1 and not runs["plain"]["stopped_by_budget"]
    fora = runs["fora"]
    assert fora["stopped_by_budget"] and fora["steps_done"] == 1
    assert fora["leakage_no_channel_max"] < 1e-4
    assert "stopped by --time-budget" in (tmp_path / "qwen3_train_step_cpu.md").read_text()


def test_leakage_matches_a_dense_float64_reference() -> None:
    """``||(W - W0) X_Q|| / ||W0 X_Q||`` and, without the channel ``U diag(delta) V^T``, for a change inside the
    feasible set (zero without the channel) and one outside it (the dense reference), Q stored whole or as its
    complement."""
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k, r = 7, 6, 3, 2
    frame, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    u_all, s_all, vh = torch.linalg.svd(w0, full_matrices=False)
    u, s, v = u_all[:, :r], s_all[:r], vh[:r].T
    q = frame[:, :k]
    x = torch.randn(40, d_in, generator=gen, dtype=torch.float64)
    xq = x @ q @ q.T
    p_u = torch.eye(d_out, dtype=torch.float64) - u @ u.T
    p_q = torch.eye(d_in, dtype=torch.float64) - q @ q.T
    delta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    inside = p_u @ torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) @ p_q
    outside = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    for complement in (False, True):
        sub = SimpleNamespace(basis=frame[:, k:] if complement else q, complement=complement, u=u, s=s, v=v, r=r)
        for change, leaks in ((inside, False), (outside, True)):
            held = bench.HeldOut(tokens=40)
            held.add("layer", x.float(), sub, w0)
            w = w0 + change + u @ torch.diag(delta) @ v.T
            layer = torch.nn.Linear(d_in, d_out, bias=False).double()
            layer.weight.data.copy_(w)
            row = held.leakage({"layer": layer}, {"layer": sub})["layer"]
            xq32 = held.x["layer"].double()  # what the benchmark keeps: X_Q in float32
            assert torch.allclose(xq32, xq, atol=1e-6)
            ref = ((w - w0) @ xq32.T).norm() / (w0 @ xq32.T).norm()
            d = w - w0
            chan = u @ torch.diag(torch.diag(u.T @ d @ v)) @ v.T
            ref_nc = ((d - chan) @ xq32.T).norm() / (w0 @ xq32.T).norm()
            assert abs(row["leakage"] - ref) <= 1e-6 * ref
            assert abs(row["leakage_no_channel"] - ref_nc) <= 1e-6 * max(ref_nc, 1e-3)
            assert (row["leakage_no_channel"] > 0.1) == leaks
            assert abs(row["delta_over_s"] - (delta.abs() / s).max()) < 1e-9 or leaks
