"""The end-of-fit proof table: ``fora_report.json`` and ``fora_report.md`` (per layer k, r, energy kept, the
channel bound when the subspace carries one, measured leakage; the model's KL(base || tuned) and perplexity)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fora_lightning.core.subspace import LayerSubspace

COLUMNS = ("layer", "k", "r", "energy", "channel_bound", "leakage")


def layer_rows(subspaces: Mapping[str, LayerSubspace], leakage: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per layer; ``channel_bound`` is ``None`` where the subspace has none, ``leakage`` where unmeasured."""
    rows = []
    for name, s in subspaces.items():
        bound = getattr(s, "channel_bound", None)
        rows.append(
            {
                "layer": name,
                "k": int(s.k),
                "r": int(s.r),
                "energy": None if math.isnan(s.energy) else float(s.energy),
                "channel_bound": None if bound is None else float(bound),
                "leakage": leakage.get(name),
            }
        )
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3e}" if isinstance(v, float) else str(v)


def markdown(summary: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """The report as Markdown: the model-level numbers, then the per-layer table."""
    lines = [f"# FORA report ({summary.get('who', 'FORA')}, step {summary.get('step')})", ""]
    for key in ("kl", "ppl", "ppl_base", "leakage_max", "leakage_mean"):
        if key in summary:
            lines.append(f"- {key}: {_cell(float(summary[key]))}")
    lines.append(f"- probe inputs: {summary.get('probe_inputs')} ({summary.get('probe_rows')} tokens per layer)")
    for capability, estimate in summary.get("calibration", {}).items():
        lines.append(f"- calibration '{capability}': {estimate['verdict']}")
    if "kl" not in summary:
        lines.append(
            "- KL / perplexity: no held-out preserved loader with base logits (datamodule.preserve_val_dataloader)"
        )
    lines += [
        "",
        (
            "leakage: ||(W - W0) X|| / ||W0 X|| on the probe inputs, spectral channel excluded; "
            "KL: mean per-token KL(base || tuned) in nats on the held-out preserved batches."
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, summary: Mapping[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write ``fora_report.json`` (``{"summary": ..., "layers": [...]}``) and ``fora_report.md``; returns the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fora_report.json"
    path.write_text(json.dumps({"summary": dict(summary), "layers": rows}, indent=2))
    (directory / "fora_report.md").write_text(markdown(summary, rows))
    return path
