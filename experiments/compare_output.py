"""What a comparison writes: ``results.json`` (the issue's shape), the Markdown table and the plot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.methods import DISPLAY_ORDER, LABELS, MARKERS
from experiments.setting import METRICS, Setting


@dataclass
class Run:
    """What one method's fit produced."""

    scores: dict[str, Any]
    trainable_params: int
    wall_s: float
    ks: dict[str, int]
    calibration: dict[str, Any] = field(default_factory=dict)  # FORA's fit-start sufficiency summary per capability


def run_row(run: Run, base: Mapping[str, Any]) -> dict[str, Any]:
    """One run's numbers; ``heldout_loss_delta`` is PEFT's forgetting measure: tuned minus base mean per-token
    loss (nats) over every token of the held-out text."""
    return {
        "preserved": run.scores["preserved"],
        "preserved_base": base["preserved"],
        "new_task": run.scores["new_task"],
        "kl": run.scores["preservation"]["kl"],
        "leakage": run.scores["preservation"]["leakage_mean"],
        "heldout_loss_delta": run.scores["heldout_loss"] - base["heldout_loss"],
        "trainable_params": run.trainable_params,
        "wall_s": round(run.wall_s, 2),
        "k_mean": sum(run.ks.values()) / len(run.ks) if run.ks else 0.0,
    }


def metric_names(setting: Setting) -> dict[str, Any]:
    """The setting's name, metric labels and directions (the head of every results.json)."""
    return {
        "setting": setting.setting,
        "preserved_metric": setting.preserved.label,
        "new_task_metric": setting.new_task.label,
        "higher_is_better": {
            "preserved": setting.preserved.higher_is_better,
            "new_task": setting.new_task.higher_is_better,
        },
    }


def results_json(setting: Setting, base: dict[str, Any], runs: Mapping[str, Run]) -> dict[str, Any]:
    """The issue's shape: setting, metric names, directions and one entry per method."""
    ordered = sorted(runs.items(), key=lambda kv: DISPLAY_ORDER.index(kv[0]))
    return {**metric_names(setting), "methods": {name: run_row(run, base) for name, run in ordered}}


def _fmt(value: float, metric: str) -> str:
    return f"{100 * value:.1f}%" if metric == "exact_match" else f"{value:.3f}"


def format_table(
    results: dict[str, Any], setting: Setting, base: dict[str, Any], runs: Mapping[str, Run], steps: int
) -> str:
    """Markdown: method x {new task, preserved (change), extras, KL, leakage, trainable params, wall time, k}."""
    pm, nm = setting.preserved.metric, setting.new_task.metric
    extra = list(setting.extra.values())
    head = ["method", f"new task: {setting.new_task.label}", f"preserved: {setting.preserved.label}", "change"]
    head += [f"preserved: {e.label}" for e in extra] + [
        "KL(base‖tuned)",
        "Δ held-out loss",
        "leakage",
        "trainable params",
        "wall s",
        "k mean",
    ]
    lines = [
        f"Setting `{setting.setting}`, seed {setting.seed}, {steps} optimizer steps per method. "
        f"Base model: new task {_fmt(base['new_task'], nm)}, preserved {_fmt(base['preserved'], pm)}"
        + "".join(f", {e.label} {_fmt(base[f'extra/{e.name}'], e.metric)}" for e in extra)
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for name, r in results["methods"].items():
        change = r["preserved"] - r["preserved_base"]
        change_s = f"{100 * change:+.1f} pt" if pm == "exact_match" else f"{change:+.3f}"
        cells = [LABELS[name], _fmt(r["new_task"], nm), _fmt(r["preserved"], pm), change_s]
        cells += [_fmt(runs[name].scores[f"extra/{e.name}"], e.metric) for e in extra]
        cells += [
            f"{r['kl']:.4f}",
            f"{r['heldout_loss_delta']:+.4f}",
            f"{r['leakage']:.4f}",
            f"{r['trainable_params']:,}",
            f"{r['wall_s']:.1f}",
            f"{r['k_mean']:.1f}" if r["k_mean"] else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", FOOTNOTE]
    return "\n".join(lines)


FOOTNOTE = (
    "KL: mean per-token KL(base ‖ tuned) in nats on held-out preserved text; Δ held-out loss: PEFT's forgetting "
    "measure, the change in mean per-token loss (nats, every token) on that text; leakage: mean over target layers of "
    "‖(W − W0) X‖ / ‖W0 X‖ with X the layer's inputs in the base model on that text; k mean: protected input "
    "directions per layer (weight projection, random and OSF copy FORA's k layer by layer; OSF's are frozen "
    "singular triplets). PEFT peers are scored merged (merge_and_unload)."
)


def plot(results: dict[str, Any], setting: Setting, path: Path) -> None:
    """Preservation (y) against the new task (x), one labelled point per method, the base model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = {m: (100.0 if m == "exact_match" else 1.0) for m in METRICS}
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    methods = results["methods"]
    for i, (name, r) in enumerate(methods.items()):
        x, y = r["new_task"] * scale[setting.new_task.metric], r["preserved"] * scale[setting.preserved.metric]
        color = f"C{i}"  # baselines hollow, each its own marker, so that coinciding points stay visible
        ax.scatter(
            x,
            y,
            s=140 if name.startswith("fora") else 70,
            marker=MARKERS[name],
            label=LABELS[name],
            zorder=3,
            facecolors=color if name.startswith("fora") else "none",
            edgecolors=color,
            linewidths=1.5,
        )
    base = next(iter(methods.values()))["preserved_base"] * scale[setting.preserved.metric]
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (preserved)")
    label_axes(ax, setting)
    ax.set_title(f"{setting.setting}: preservation vs new task")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_axes(ax: Any, setting: Setting) -> None:
    """x: the new task's metric, y: the kept capability's (with units, and which way is better)."""
    unit = {"exact_match": " (%)", "perplexity": ""}
    for task, role, set_label in (
        (setting.new_task, "new task", ax.set_xlabel),
        (setting.preserved, "preserved", ax.set_ylabel),
    ):
        set_label(f"{role}: {task.label}{unit[task.metric]}" + ("" if task.higher_is_better else " (lower is better)"))
