"""Output-side protection experiment (issue 16 item 2): block only the output directions the kept capability's
loss is sensitive to (the K-FAC left factor), over seeds, both axes.

    python scripts/output_side.py --config configs/compare_demo.yaml --output results/output_side/demo --seeds 0 1 2 \\
        --variant "fora=fora:" --variant "out0.9=output:output_energy=0.9" --variant "out0.99=output:output_energy=0.99"

Per layer ``y = W x``: ``F = sum_t g_t g_t^T`` with ``g_t = dL/dy_t``, ``L = sum_t CE(logits_t, y~_t)`` on the
calibration batches (each extended by the base model's own greedy continuation of ``generate`` tokens; label-free),
``y~_t`` sampled from the base model's own softmax (``labels=sampled``: the true Fisher) or its argmax
(``labels=greedy``). ``U_g``: F's top-m eigenvectors, m by the energy rule at ``output_energy``.

With FORA's set ``S = {P_U M P_Q + U_r diag(delta) V_r^T}`` the output-side set adds ``T = {P_B N Q Q^T}``, ``P_B = I -
B B^T``, ``B`` an orthonormal basis of span[U_g, U_r]. ``S`` and ``T`` are Frobenius-orthogonal (``Q Q^T P_Q = 0``,
``U_r^T P_B = 0``), so the projection is

    Pi_out(G) = Pi(G) + P_B G Q Q^T        (r = 0:  G - U_g U_g^T G Q Q^T)

applied to the gradient before the step and to ``D = W - W0`` after it (:class:`OutputSideFORA`, a patch of FORA,
not an option). On span(Q) the update now changes outputs in span(B)'s complement: the exact guarantee is traded
for plasticity. Writes ``results.json`` and ``table.md`` as ``scripts/plasticity.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experiments.methods as methods_mod  # noqa: E402
from experiments.compare import run_method  # noqa: E402
from fora_lightning import FORA  # noqa: E402
from fora_lightning.core.energy import energy_rank  # noqa: E402
from fora_lightning.core.targets import find_targets  # noqa: E402
from fora_lightning.llm import CausalLMModule, TextDataModule  # noqa: E402
from scripts.plasticity import experiment, seed_setup, table  # noqa: E402


# ------------------------------------------------------------------------------------------ the left factor
def output_fisher(setting: Any, dm: TextDataModule, generate: int, labels: str, seed: int) -> dict[str, Tensor]:
    """``F_l = sum_t g_t g_t^T`` (float64, ``d_out x d_out``) of every target, ``g_t = dL/dy_t`` under the base model."""
    module = CausalLMModule(**setting.model).eval()
    targets = find_targets(module, setting.target_modules)
    fisher: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: torch.nn.Module, _gin: tuple, gout: tuple) -> None:
            g = gout[0].double().reshape(-1, gout[0].shape[-1])
            fisher[name] = fisher.get(name, 0) + g.T @ g

        return fn

    gen = torch.Generator().manual_seed(seed)
    handles = [m.register_full_backward_hook(hook(n)) for n, m in targets.items()]
    for batch in dm.calibration_dataloader():
        if generate > 0:
            with torch.no_grad():
                batch = module.generate_continuations(batch, generate)
        mask = batch["attention_mask"].bool()
        logits = module.calibration_step(batch).logits.float()
        with torch.no_grad():
            probs = logits.softmax(-1)
            y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(mask.shape)
            y = logits.argmax(-1) if labels == "greedy" else y
        loss = torch.nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum")
        module.zero_grad(set_to_none=True)
        loss.backward()
    for h in handles:
        h.remove()
    return fisher


def left_bases(fisher: Mapping[str, Tensor], energy: float) -> dict[str, Tensor]:
    """``U_g``: the top-m eigenvectors of each ``F`` (float32), ``m = energy_rank(eigenvalues, energy)``."""
    out = {}
    for name, f in fisher.items():
        evals, evecs = torch.linalg.eigh(f)
        evals, evecs = evals.flip(0), evecs.flip(1)
        out[name] = evecs[:, : energy_rank(evals, energy)].float().contiguous()
    return out


def blocked_outputs(u_g: Tensor, u_r: Tensor | None) -> Tensor:
    """``B``: an orthonormal basis of span[U_g, U_r] (SVD; directions below 1e-6 dropped)."""
    both = u_g if u_r is None or u_r.shape[1] == 0 else torch.cat([u_g, u_r.to(u_g)], 1)
    if both.shape[1] == 0:
        return both
    u, s, _ = torch.linalg.svd(both.double(), full_matrices=False)
    return u[:, s > 1e-6].to(u_g.dtype).contiguous()


def give_back(x: Tensor, b: Tensor, q: Tensor) -> Tensor:
    """``P_B X Q Q^T`` for ``X`` (d_out x d_in); ``X Q`` is formed once."""
    xq = x @ q
    return (xq - b @ (b.T @ xq)) @ q.T


# ------------------------------------------------------------------------------------------ the patched callback
class OutputSideFORA(FORA):
    """FORA whose projection is ``Pi_out(G) = Pi(G) + P_B G Q Q^T`` (gradient and re-projection, mode='update')."""

    left: Mapping[str, Tensor] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._blocked: dict[str, Tensor] = {}

    def _b(self, name: str) -> Tensor:
        if name not in self._blocked:
            self._blocked[name] = blocked_outputs(self.left[name], self.subspaces[name].u)
        return self._blocked[name]

    def _pairs(self) -> Iterator[tuple[str, torch.nn.Module, Tensor, Tensor]]:
        for name, module in self.protection.targets.items():
            yield name, module, self._b(name), self.subspaces[name].reprojection_basis

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        raw = {
            n: m.weight.grad.detach().clone() for n, m in self.protection.targets.items() if m.weight.grad is not None
        }
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.config.project_gradients:
            for name, module, b, q in self._pairs():
                if name in raw:
                    module.weight.grad.add_(give_back(raw[name], b, q))

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:  # noqa: ANN001
        dq = {n: m.weight @ q - self.subspaces[n].anchor_q for n, m, _, q in self._pairs()}  # D Q
        super()._after_optimizer_step(optimizer, args, kwargs)
        for name, module, b, q in self._pairs():
            module.weight.add_((dq[name] - b @ (b.T @ dq[name])) @ q.T)


@contextmanager
def output_side(left: Mapping[str, Tensor]) -> Iterator[None]:
    """Within: ``build_callback``'s FORA is :class:`OutputSideFORA` with these ``U_g``."""
    original = methods_mod.FORA
    methods_mod.FORA = type("OutputSideFORA", (OutputSideFORA,), {"left": dict(left)})
    try:
        yield
    finally:
        methods_mod.FORA = original


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    a, setting, out, path, results, variants = experiment()
    evaluator = None
    for seed in a.seeds:
        seeded, dm, evaluator = seed_setup(setting, seed, evaluator, results)
        fishers: dict[tuple[int, str], dict[str, Tensor]] = {}
        for label, kind, given in variants:
            args, overrides = dict(setting.methods["fora"]), dict(given)
            m_sum = None
            if kind == "output":
                energy = float(overrides.pop("output_energy"))
                key = (int(overrides.pop("generate", 12)), str(overrides.pop("labels", "sampled")))
                if key not in fishers:
                    fishers[key] = output_fisher(setting, dm, key[0], key[1], seed)
                left = left_bases(fishers[key], energy)
                with output_side(left):
                    run = run_method("fora", {**args, **overrides}, seeded, dm, evaluator, None, False, label)
                m_sum = sum(u.shape[1] for u in left.values())
            else:
                run = run_method("fora", {**args, **overrides}, seeded, dm, evaluator, None, False, label)
            pres = run.scores["preservation"]
            row = {
                "preserved": run.scores["preserved"],
                "new_task": run.scores["new_task"],
                "kl": pres.get("kl"),
                "leakage": pres.get("leakage_mean"),
                "k_sum": sum(run.ks.values()),
                "m_sum": m_sum,
                "m": {n: u.shape[1] for n, u in left.items()} if kind == "output" else None,
                "k": run.ks,
                "wall_s": round(run.wall_s, 1),
            }
            results.setdefault(label, {"kind": kind, "args": given})[str(seed)] = row
            shown = {k: row[k] for k in ("new_task", "preserved", "kl", "k_sum", "m_sum")}
            print(label, seed, json.dumps(shown), flush=True)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table(results, setting.trainer.get("max_steps")) + "\n")
    print(table(results, setting.trainer.get("max_steps")))


if __name__ == "__main__":
    main()
