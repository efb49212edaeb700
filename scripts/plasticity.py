"""Plasticity experiments (issue 16 item 2): FORA variants on one compare setting over seeds, both axes.

    python scripts/plasticity.py --config configs/compare_demo.yaml --output results/plasticity/demo --seeds 0 1 2 \\
        --variant "fora=fora:" --variant "centred=centred:" --variant "comp2=compensate:max_scale=2.0"

A variant is ``label=kind:key=value,...`` (values YAML). ``kind``: ``fora`` (any ForaConfig fields over the config's
``fora`` args), ``centred`` (Q from the centred covariance plus the mean direction, :func:`centred_spectra`;
``equal_k=true``: the same k per layer as this seed's ``fora`` run) or ``compensate`` (each projected step rescaled
to the raw optimizer step's norm, at most ``max_scale``; :class:`CompensatedFORA`). The last two are experiments
(patches of FORA's internals), not options. The ``allocation="trace"/"output"`` rows of results/plasticity were
measured with the ``allocation`` setting, removed since (not adopted; its README names the last commit that has it). Writes ``results.json`` (label -> seed -> scores) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experiments.methods as methods_mod  # noqa: E402
import fora_lightning.protection as protection_mod  # noqa: E402
from experiments.compare import Evaluator, run_method  # noqa: E402
from experiments.setting import Setting, load_setting  # noqa: E402
from fora_lightning import FORA  # noqa: E402
from fora_lightning.core.targets import find_targets  # noqa: E402
from fora_lightning.llm import CausalLMModule, TextDataModule  # noqa: E402
from scripts.demo_variants import parse_variant  # noqa: E402


# ------------------------------------------------------------------------------------------ centred covariance
@torch.no_grad()
def input_means(setting: Any, dm: TextDataModule) -> dict[str, Tensor]:
    """``mu = (1/N) sum_t x_t`` of every target's input over the calibration tokens (non-padding), float64."""
    module = CausalLMModule(**setting.model).eval()
    targets = find_targets(module, setting.target_modules)
    sums: dict[str, Tensor] = {}
    count = [0]
    mask: list[Tensor] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].double()
            sums[name] = sums.get(name, 0) + x[mask[0]].sum(0)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    for batch in dm.calibration_dataloader():
        am = batch.get("attention_mask")
        mask[:] = [am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)]
        count[0] += int(mask[0].sum())
        module.calibration_step(batch)
    for h in handles:
        h.remove()
    return {n: s / count[0] for n, s in sums.items()}


def centred_spectrum(cov: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """Basis ``[m, top eigenvectors of (I - m m^T)(C - mu mu^T)(I - m m^T)]`` (m = mu/|mu|), each with the
    uncentred energy ``b^T C b`` it holds (so the energy rule reads the same trace); sorted: m first."""
    c = cov.double()
    m = (mu / mu.norm()).to(c)
    p = torch.eye(c.shape[0], dtype=c.dtype) - torch.outer(m, m)
    sigma = p @ (c - torch.outer(mu.to(c), mu.to(c))) @ p
    evecs = torch.linalg.eigh(sigma).eigenvectors.flip(1)  # m itself is a null vector: last after the flip
    basis, _ = torch.linalg.qr(torch.cat([m[:, None], evecs], 1))  # Gram-Schmidt: m, then sigma's in order
    basis = basis[:, : c.shape[0]] * torch.sign(torch.diagonal(_)[: c.shape[0]])
    energy = ((c @ basis) * basis).sum(0)
    return energy, basis


@contextmanager
def centred_bases(means: Mapping[str, Tensor], ranks: Mapping[str, int] | None):
    """Within: FORA's subspaces come from :func:`centred_spectrum` (``ranks``: those k per layer)."""
    original = protection_mod.estimate_subspaces

    def patched(weights, config, covariances=None, spectra=None, allow_complement=False):  # noqa: ANN001, ANN202
        owners = {covariances.owner[n] for n in weights}
        spectra = {o: centred_spectrum(covariances.covariance(o), means[o]) for o in owners}
        if ranks is not None:
            config = replace(config, rank=dict(ranks))
        return original(weights, config, covariances, spectra, allow_complement)

    protection_mod.estimate_subspaces = patched
    try:
        yield
    finally:
        protection_mod.estimate_subspaces = original


# ------------------------------------------------------------------------------------------ step-size compensation
class CompensatedFORA(FORA):
    """FORA whose re-projected step ``P(s)`` is rescaled to ``min(max_scale, ||s|| / ||P(s)||) P(s)`` per layer
    (``s``: the optimizer's raw step), then re-projected again (the channel's clamp stays exact)."""

    max_scale = 2.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._before: dict[str, Tensor] = {}
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._before = {n: m.weight.detach().clone() for n, m in self.protection.targets.items()}

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:  # noqa: ANN001
        raw = {n: (m.weight - self._before[n]).norm() for n, m in self.protection.targets.items()}
        super()._after_optimizer_step(optimizer, args, kwargs)
        for n, m in self.protection.targets.items():
            step = m.weight - self._before[n]
            scale = float((raw[n] / step.norm().clamp_min(1e-30)).clamp(1.0, self.max_scale))
            self.scales.append(scale)
            m.weight.copy_(self._before[n] + scale * step)
        super()._after_optimizer_step(optimizer, args, kwargs)


@contextmanager
def compensated(max_scale: float):
    original = methods_mod.FORA
    methods_mod.FORA = type("CompensatedFORA", (CompensatedFORA,), {"max_scale": max_scale})  # build_callback's
    try:
        yield
    finally:
        methods_mod.FORA = original


# ------------------------------------------------------------------------------------------ driver
def experiment() -> tuple[argparse.Namespace, Setting, Path, Path, dict[str, Any], list]:
    """The command line (``--config --output --variant ... --seeds``), the setting, and the results so far."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = parser.parse_args()
    setting = load_setting(a.config)
    setting.output_dir = a.output
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(setting.threads or 1)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return a, setting, out, path, results, [parse_variant(v) for v in a.variant]


def seed_setup(
    setting: Setting, seed: int, evaluator: Evaluator | None, results: dict[str, Any]
) -> tuple[Setting, TextDataModule, Evaluator]:
    """One seed's setting and data; the evaluator (and ``results["base"]``) on the first seed."""
    seeded = replace(setting, seed=seed)
    dm = TextDataModule(**{"seed": seed, **setting.data})
    dm.setup("fit")
    if evaluator is None:
        pl.seed_everything(seed, verbose=False)
        base_model = CausalLMModule(**setting.model).model.eval().requires_grad_(False)
        evaluator = Evaluator(setting, dm.tokenizer, base_model, dm.add_bos, dm.append_eos, dm.max_length)
        results["base"] = evaluator.base_scores()
    return seeded, dm, evaluator


def main() -> None:
    a, setting, out, path, results, variants = experiment()
    evaluator = None
    for seed in a.seeds:
        seeded, dm, evaluator = seed_setup(setting, seed, evaluator, results)
        means = None
        fora_ks: dict[str, int] | None = None
        for label, kind, given in variants:
            args, overrides = dict(setting.methods["fora"]), dict(given)
            if kind == "centred":
                means = means or input_means(setting, dm)
                ranks = fora_ks if overrides.pop("equal_k", False) else None
                with centred_bases(means, ranks):
                    run = run_method("fora", {**args, **overrides}, seeded, dm, evaluator, None, False, label)
            elif kind == "compensate":
                with compensated(float(overrides.pop("max_scale", 2.0))):
                    run = run_method("fora", {**args, **overrides}, seeded, dm, evaluator, None, False, label)
            else:
                run = run_method("fora", {**args, **overrides}, seeded, dm, evaluator, None, False, label)
            if label == "fora":
                fora_ks = run.ks
            pres = run.scores["preservation"]
            row = {
                "preserved": run.scores["preserved"],
                "new_task": run.scores["new_task"],
                "kl": pres.get("kl"),
                "leakage": pres.get("leakage_mean"),
                "k_sum": sum(run.ks.values()),
                "k": run.ks,
                "wall_s": round(run.wall_s, 1),
            }
            results.setdefault(label, {"kind": kind, "args": given})[str(seed)] = row
            print(label, seed, json.dumps({k: row[k] for k in ("new_task", "preserved", "kl", "k_sum")}), flush=True)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table(results, setting.trainer.get("max_steps")) + "\n")
    print(table(results, setting.trainer.get("max_steps")))


def table(results: Mapping[str, Any], steps: Any) -> str:
    """label, kind, args, new task and kept (mean ± std over seeds), KL, sum k, seeds."""
    rows = [
        f"{steps} steps; mean ± sample std over seeds",
        "",
        "| variant | kind | args | new task | kept | KL | sum k | seeds |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for label, r in results.items():
        if label == "base":
            continue
        seeds = sorted(k for k in r if k.isdigit())
        cell = {}
        for key in ("new_task", "preserved", "kl"):
            vals = [r[s][key] for s in seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            scale = 1 if key == "kl" else 100
            cell[key] = (
                f"{scale * statistics.mean(vals):.{4 if key == 'kl' else 1}f} ± {scale * sd:.{4 if key == 'kl' else 1}f}"
            )
        args = ", ".join(f"{k}={v}" for k, v in r["args"].items())
        k_sum = statistics.mean(r[s]["k_sum"] for s in seeds)
        rows.append(
            f"| {label} | {r['kind']} | {args} | {cell['new_task']} | {cell['preserved']} | {cell['kl']} | {k_sum:.0f} | {' '.join(seeds)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
