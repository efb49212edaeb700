"""``fora-inspect`` / ``python cli.py inspect``: what a subspace file protects, from the file alone.

Per layer: d_in, k, energy kept, memory, and the overlap between the function basis Q and the
weight's top right singular vectors V_r: the cosines ``cos theta_i`` of their principal angles
(singular values of ``Q^T V_r``), summarised as ``mean cos^2 = ||Q^T V_r||_F^2 / r`` (chance level
for a random k-dim Q: ``k / d_in``) and the smallest/largest angle. Optional PNGs: eigen-spectra
with the chosen k marked, and heat maps of k/d_in and overlap across blocks (needs ``[plot]``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fora_lightning.core.capabilities import principal_cosines
from fora_lightning.core.energy import cumulative_energy
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.subspace_file import load_subspaces

_BYTES_F32 = 4


def layer_report(name: str, sub: LayerSubspace, capability_energy: Mapping[str, float] | None = None) -> dict[str, Any]:
    """One table row: shapes, k, energy, memory (file; at fit with anchors ``W0 Q`` and ``U_r^T W0``), overlap with V_r."""
    cos = principal_cosines(sub.basis, sub.v, sub.complement)
    r = sub.r
    overlap = float((cos**2).sum() / r) if r else float("nan")
    anchors = 0 if sub.complement else (sub.d_out * sub.k + r * sub.d_in) * _BYTES_F32
    angles = torch.rad2deg(torch.arccos(cos)) if cos.numel() else cos
    return {
        "layer": name,
        "d_out": sub.d_out,
        "d_in": sub.d_in,
        "k": sub.k,
        "r": r,
        "complement": sub.complement,
        "energy": None if math.isnan(sub.energy) else sub.energy,
        "capability_energy": dict(capability_energy or {}),
        "file_bytes": sub.nbytes(),
        "fit_bytes": sub.nbytes() + anchors,
        "overlap": None if math.isnan(overlap) else overlap,
        "chance": sub.k / sub.d_in,
        "angle_min": float(angles.min()) if angles.numel() else None,
        "angle_max": float(angles.max()) if angles.numel() else None,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    """The per-layer table with a header naming the model, capabilities and chain."""
    caps = meta.get("capabilities") or {}
    model = meta.get("model") or {}
    lines = [
        f"FORA subspace file (format version {meta.get('upgraded_from', meta.get('version'))}, created {meta.get('created')}) "
        f"for model '{model.get('name', '?')}'",
    ]
    for name, info in caps.items():
        lines.append(
            f"  capability '{name}': {info.get('tokens', '?'):,} tokens, weight {info.get('weight', float('nan')):.3g}, "
            f"step {info.get('step', '?')}, data {str(info.get('fingerprint', '?'))[:19]}"
        )
    if meta.get("chain"):
        lines.append(
            "  chain: "
            + " -> ".join(f"{c['step']}:{'+'.join(c['capabilities']) or '-'} ({c['method']})" for c in meta["chain"])
        )
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines.append(
        f"{'layer':<{width}} {'d_out x d_in':>12} {'k':>5} {'k/d_in':>6} {'r':>3} {'energy':>7} {'MiB fit':>8} "
        f"{'overlap':>7} {'chance':>6} {'angles deg':>11}"
    )
    for r in rows:
        k = f"{r['k']}{'c' if r['complement'] else ''}"
        angles = "-" if r["angle_min"] is None else f"{r['angle_min']:.0f}-{r['angle_max']:.0f}"
        lines.append(
            f"{r['layer']:<{width}} {str(r['d_out']) + 'x' + str(r['d_in']):>12} {k:>5} {r['k'] / r['d_in']:>6.2f} {r['r']:>3} "
            f"{_fmt(r['energy'], '.4f'):>7} {r['fit_bytes'] / 2**20:>8.3f} {_fmt(r['overlap'], '.3f'):>7} {r['chance']:>6.2f} {angles:>11}"
        )
    per_cap = sorted({c for r in rows for c in r["capability_energy"]})
    if per_cap:
        lines.append(
            "energy kept per capability (min / mean over layers): "
            + ", ".join(
                f"{c} {min(r['capability_energy'][c] for r in rows if c in r['capability_energy']):.3f} / "
                f"{sum(r['capability_energy'][c] for r in rows if c in r['capability_energy']) / sum(c in r['capability_energy'] for r in rows):.3f}"
                for c in per_cap
            )
        )
    total = sum(r["fit_bytes"] for r in rows)
    lines.append(
        f"{len(rows)} layers, {total / 2**20:.2f} MiB at fit (bases + anchors); overlap = mean cos^2 of the principal angles "
        "between Q and V_r (1: V_r inside span(Q); chance = k/d_in)"
    )
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "fora-inspect plots need matplotlib: pip install 'fora-lightning[plot]' (or pass --no-plots)"
        ) from e
    return plt


def _grid_position(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers.3``, ``self_attn.q_proj``): the block and the role."""
    match = next(reversed(list(re.finditer(r"(?:^|\.)(\d+)(?=\.)", name))), None)  # the last block index
    if match is None:
        return "-", name
    return name[: match.end()], name[match.end() + 1 :]


def plot_spectra(subspaces: Mapping[str, LayerSubspace], path: Path) -> Path:
    """Normalised eigen-spectra ``lambda_i / lambda_1`` (log) and cumulative energy, one line per distinct spectrum, k marked."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: list[tuple[torch.Tensor, list[str], int]] = []
    for name, sub in subspaces.items():
        if sub.spectrum is None:
            continue
        for spec, names, k in groups:
            if k == sub.k and spec.shape == sub.spectrum.shape and torch.equal(spec, sub.spectrum):
                names.append(name)
                break
        else:
            groups.append((sub.spectrum, [name], sub.k))
    cmap = plt.get_cmap("viridis")
    for i, (spec, names, k) in enumerate(groups):
        lam = spec.double().clamp_min(0)
        color = cmap(i / max(len(groups) - 1, 1))
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
        x = torch.arange(1, lam.numel() + 1)
        ax1.semilogy(x, (lam / lam[0].clamp_min(1e-300)).clamp_min(1e-12), color=color, lw=1, label=label)
        cum = cumulative_energy(lam)
        ax2.plot(x, cum, color=color, lw=1)
        if 0 < k <= lam.numel():
            ax1.plot([k], [max(float(lam[k - 1] / lam[0].clamp_min(1e-300)), 1e-12)], "o", color=color, ms=4)
            ax2.plot([k], [float(cum[k - 1])], "o", color=color, ms=4)
    ax1.set(xlabel="eigenvalue index i", ylabel="lambda_i / lambda_1", title="input covariance spectra (dot: chosen k)")
    ax2.set(
        xlabel="k",
        ylabel="energy held by top k",
        title="cumulative energy (dot: chosen k)",
        ylim=(0, 1.02),
        xscale="log",
    )
    if len(groups) <= 12:
        ax1.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    """Heat maps over (block x role): k / d_in and the Q-V_r overlap (mean cos^2)."""
    plt = _pyplot()
    blocks: list[str] = []
    roles: list[str] = []
    for r in rows:
        b, role = _grid_position(r["layer"])
        blocks += [b] if b not in blocks else []
        roles += [role] if role not in roles else []
    grids = {key: torch.full((len(blocks), len(roles)), float("nan")) for key in ("k", "overlap")}
    for r in rows:
        b, role = _grid_position(r["layer"])
        i, j = blocks.index(b), roles.index(role)
        grids["k"][i, j] = r["k"] / r["d_in"]
        grids["overlap"][i, j] = float("nan") if r["overlap"] is None else r["overlap"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(roles) * 2), max(3, 0.45 * len(blocks) + 1.8)))
    for ax, (key, title) in zip(
        axes, (("k", "k / d_in (protected fraction of inputs)"), ("overlap", "overlap of Q with V_r (mean cos^2)"))
    ):
        im = ax.imshow(grids[key].numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(roles)), [r.split(".")[-1] for r in roles], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [b.split(".")[-1] for b in blocks], fontsize=8)
        ax.set(title=title, xlabel="layer", ylabel="block")
        for i in range(len(blocks)):
            for j in range(len(roles)):
                v = float(grids[key][i, j])
                if not math.isnan(v):
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black"
                    )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``fora-inspect --subspaces FILE [--out PREFIX] [--no-plots] [--json FILE]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fora-inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subspaces", required=True, help="a FORA subspace file (.safetensors)")
    parser.add_argument(
        "--out", help="prefix for the PNGs: PREFIX_spectra.png, PREFIX_heatmap.png (default: next to the file)"
    )
    parser.add_argument("--no-plots", action="store_true", help="print the table only (no matplotlib needed)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if not args.no_plots:
        try:
            _pyplot()
        except ImportError as e:
            parser.error(str(e))
    path = Path(args.subspaces)
    try:
        subspaces, meta = load_subspaces(path)
    except (ValueError, FileNotFoundError) as e:  # a corrupt or inconsistent file: the message names file and layer
        parser.error(str(e))
    rows = [layer_report(n, s, (meta["layers"][n] or {}).get("capability_energy")) for n, s in subspaces.items()]
    print(format_table(rows, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"file": str(path), "metadata": meta, "layers": rows}, indent=1))
    if not args.no_plots:
        prefix = Path(args.out) if args.out else path.with_suffix("")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for written in (
            plot_spectra(subspaces, prefix.with_name(prefix.name + "_spectra.png")),
            plot_heatmap(rows, prefix.with_name(prefix.name + "_heatmap.png")),
        ):
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
