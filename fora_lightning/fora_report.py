"""The end-of-fit proof table: ``fora_report.json`` and ``fora_report.md`` (per layer k, r, energy kept, the
channel bound when the subspace carries one, the leakage sentinel's last readings and their bounds; the sentinel's
probe source, worst readings of the fit and verdict; the model's KL(base || tuned) and perplexity)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fora_lightning.core.subspace import LayerSubspace

COLUMNS = (
    "layer",
    "k",
    "r",
    "energy",
    "channel_bound",
    "leakage",
    "span_change",
    "span_bound",
    "leakage_heldout",
    "heldout_tolerance",
)
SENTINEL = ("leakage", "span_change", "heldout")  # the summary's worst_<kind> entries, in this order


def layer_rows(
    subspaces: Mapping[str, LayerSubspace],
    leakage: Mapping[str, float],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per layer; ``channel_bound`` is ``None`` where the subspace has none, ``leakage`` where unmeasured;
    ``extra``: layer -> further columns (the sentinel's ``span_change``, ``span_bound``, ``leakage_heldout``,
    ``heldout_tolerance``)."""
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
                **{c: (extra or {}).get(name, {}).get(c) for c in COLUMNS[6:]},
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
    lines.append(
        f"- probe inputs: {summary.get('probe_inputs')} ({summary.get('probe_rows')} tokens per layer, "
        f"{summary.get('probe_bytes', 0) / 2**20:.2f} MiB)"
    )
    if "verdict" in summary:
        lines.append(
            f"- leakage sentinel: {summary['verdict']} after {summary.get('sentinel_checks', 0)} checks "
            f"(on_violation={summary.get('on_violation')!r})"
        )
    for kind in SENTINEL:
        w = summary.get(f"worst_{kind}")
        if w:
            lines.append(
                f"- worst {kind}: {_cell(w['value'])} (layer {w['layer']}, step {w['step']}; "
                f"{'tolerance' if kind == 'heldout' else 'bound'} {_cell(w['bound'])})"
            )
    if summary.get("violation"):
        v = summary["violation"]
        lines.append(
            f"- first violation: layer {v.get('layer')} at step {v.get('step')}: {'; '.join(v.get('causes', []))}"
        )
    for capability, estimate in summary.get("calibration", {}).items():
        counted = (
            f" ({estimate['distinct_rows']:,} distinct of {estimate['rows']:,} rows)" if "rows" in estimate else ""
        )
        lines.append(f"- calibration '{capability}': {estimate.get('verdict', 'not estimated')}{counted}")
    if "kl" not in summary:
        lines.append(
            "- KL / perplexity: no held-out preserved loader with base logits (datamodule.preserve_val_dataloader)"
        )
    lines += [
        "",
        (
            "leakage: ||f(X_Q) - f0(X_Q)|| / ||f0(X_Q)|| on the probe rows' span(Q) part X_Q, the spectral channel's "
            "best fit removed (bound: the numerical tolerance); span_change: the same with the channel (bound: "
            "channel_bound); leakage_heldout: on the raw probe rows (informational: inputs outside span(Q) are not "
            "protected; tolerance: their base response changing by 100 %); KL: mean per-token KL(base || tuned) in "
            "nats on the held-out preserved batches."
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
