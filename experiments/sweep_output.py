"""What a sweep (or multi-seed) comparison writes: ``results.json``, ``results.csv``, ``table.md``, ``pareto.png``.

Every point (:class:`~experiments.sweep.Point`) holds its per-seed rows
(:func:`~experiments.compare_output.run_row`) and their :func:`~experiments.sweep.aggregate`;
the Pareto front is taken on the seed means of (new task, preserved), each in its own direction.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.compare_output import FOOTNOTE, _fmt, label_axes, metric_names
from experiments.methods import DISPLAY_ORDER, LABELS, MARKERS
from experiments.setting import Setting
from experiments.sweep import Point, aggregate, pareto_mask

CSV_FIELDS = ("preserved", "new_task", "heldout_loss_delta", "kl", "leakage", "k_mean", "trainable_params", "wall_s")


def sweep_results(
    setting: Setting,
    base: Mapping[str, Any],
    points: Sequence[Point],
    rows: Mapping[str, Mapping[int, Mapping[str, Any]]],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """``{setting, metrics, seeds, base, points: [{key, method, knob, value, args, seeds: {seed: row}, stats, pareto}]}``;
    ``rows[point.key][seed]`` is one run's row (a point may lack seeds not run yet); points sorted by method (display order), then as swept."""
    order = sorted(points, key=lambda p: DISPLAY_ORDER.index(p.method))
    out = [
        {
            "key": p.key,
            "method": p.method,
            "knob": p.knob,
            "value": p.value,
            "args": p.args,
            "seeds": {str(s): dict(rows[p.key][s]) for s in seeds if s in rows[p.key]},
            "stats": aggregate([rows[p.key][s] for s in seeds if s in rows[p.key]]),
        }
        for p in order
    ]
    mask = pareto_mask(
        [p["stats"]["new_task"]["mean"] for p in out],
        [p["stats"]["preserved"]["mean"] for p in out],
        setting.new_task.higher_is_better,
        setting.preserved.higher_is_better,
    )
    for p, on_front in zip(out, mask, strict=True):
        p["pareto"] = on_front
    return {**metric_names(setting), "seeds": list(seeds), "base": dict(base), "points": out}


def write_csv(results: Mapping[str, Any], path: Path) -> None:
    """One line per point: method, knob, value, n seeds, Pareto flag, then mean/std/min/max of each field."""
    head = ["key", "method", "knob", "value", "n_seeds", "pareto"]
    head += [f"{f}_{s}" for f in CSV_FIELDS for s in ("mean", "std", "min", "max")]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for p in results["points"]:
            st = p["stats"]
            writer.writerow(
                [
                    p["key"],
                    p["method"],
                    p["knob"] or "",
                    "" if p["value"] is None else p["value"],
                    st["new_task"]["n"],
                    int(p["pareto"]),
                ]
                + [st[f][s] for f in CSV_FIELDS for s in ("mean", "std", "min", "max")]
            )


def _pm(stats: Mapping[str, float], metric: str) -> str:
    """``mean ± std`` (exact match in % with the std in points, perplexity plain)."""
    if metric == "exact_match":
        return f"{_fmt(stats['mean'], metric)} ± {100 * stats['std']:.1f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def sweep_table(results: Mapping[str, Any], setting: Setting, steps: int) -> str:
    """Markdown: one row per point, mean ± std over seeds, the Pareto-optimal points marked."""
    pm, nm = setting.preserved.metric, setting.new_task.metric
    base = results["base"]
    seeds = results["seeds"]
    head = [
        "method",
        "knob",
        f"new task: {setting.new_task.label}",
        f"preserved: {setting.preserved.label}",
        "Δ held-out loss",
        "KL(base‖tuned)",
        "leakage",
        "trainable params",
        "k mean",
        "Pareto",
    ]
    lines = [
        f"Setting `{setting.setting}`, seeds {', '.join(map(str, seeds))} (mean ± std over {len(seeds)}), {steps} optimizer "
        f"steps per run. Base model: new task {_fmt(base['new_task'], nm)}, preserved {_fmt(base['preserved'], pm)}.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 3) + ":---:|",
    ]
    for p in results["points"]:
        st = p["stats"]
        knob = "(own config)" if p["knob"] is None else f"{p['knob']} = {p['value']}"
        cells = [
            LABELS[p["method"]],
            knob,
            _pm(st["new_task"], nm),
            _pm(st["preserved"], pm),
            f"{st['heldout_loss_delta']['mean']:+.4f} ± {st['heldout_loss_delta']['std']:.4f}",
            f"{st['kl']['mean']:.4f} ± {st['kl']['std']:.4f}",
            f"{st['leakage']['mean']:.4f}",
            f"{int(st['trainable_params']['mean']):,}",
            f"{st['k_mean']['mean']:.1f}" if st["k_mean"]["mean"] else "-",
            "**yes**" if p["pareto"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "± is the sample standard deviation over seeds (min and max in results.csv); Pareto: no other point "
        "has a higher mean on both axes. " + FOOTNOTE,
    ]
    return "\n".join(lines)


def pareto_plot(results: Mapping[str, Any], setting: Setting, path: Path) -> None:
    """Preserved (y) vs new task (x): every point with its seed spread, one marker per method, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sx = 100.0 if setting.new_task.metric == "exact_match" else 1.0
    sy = 100.0 if setting.preserved.metric == "exact_match" else 1.0
    fig, ax = plt.subplots(figsize=(9, 5))
    methods = [m for m in DISPLAY_ORDER if any(p["method"] == m for p in results["points"])]
    for i, name in enumerate(methods):
        pts = [p for p in results["points"] if p["method"] == name]
        color = f"C{i % 10}"
        for j, p in enumerate(pts):
            x, y = p["stats"]["new_task"], p["stats"]["preserved"]
            ax.errorbar(
                sx * x["mean"],
                sy * y["mean"],
                xerr=sx * x["std"],
                yerr=sy * y["std"],
                fmt="none",
                ecolor=color,
                alpha=0.4,
                linewidth=1,
                zorder=2,
            )
            ax.scatter(
                sx * x["mean"],
                sy * y["mean"],
                marker=MARKERS[name],
                s=130 if p["pareto"] else 60,
                facecolors=color if p["pareto"] else "none",
                edgecolors="black" if p["pareto"] else color,
                linewidths=1.5,
                zorder=3,
                label=LABELS[name] if j == 0 else None,
            )
    front = sorted(
        (p["stats"]["new_task"]["mean"] * sx, p["stats"]["preserved"]["mean"] * sy)
        for p in results["points"]
        if p["pareto"]
    )
    if len(front) > 1:
        ax.plot(
            *zip(*front, strict=True),
            color="black",
            linewidth=1,
            linestyle=":",
            zorder=1,
            label="Pareto front (filled)",
        )
    ax.axhline(
        results["base"]["preserved"] * sy, color="grey", linestyle="--", linewidth=1, label="base model (preserved)"
    )
    label_axes(ax, setting)
    seeds = results["seeds"]
    ax.set_title(f"{setting.setting}: preservation vs new task, each method's knob swept ({len(seeds)} seeds, ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
