"""ExactMatchReport: the kept capability's and the new task's exact match, before and after fit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from transformers import AutoTokenizer, PreTrainedModel
from typing_extensions import override

from fora_lightning.callback import FORA
from fora_lightning.llm.generation import ExactMatchResult, evaluate_exact_match, read_pairs
from fora_lightning.lora.callback import ForaLoRA

ROLES = ("preserved", "new_task")
PLAIN_LORA = {"source": "none", "weight_rank": 0}  # FORA-LoRA with no protected inputs (k = 0) and no channel
_FORA_SOURCES = {"activations": "fora", "weights": "weight_projection", "random": "random"}


class ExactMatchReport(Callback):
    """Greedy-decode two prompt/answer JSON-lines files at fit start and fit end, and report exact match.

    At the end of fit it prints a table and writes ``{filename}.json`` and ``{filename}.md`` to
    ``trainer.log_dir`` (the run directory), and logs ``report/{role}_{before,after}`` to the logger.
    The JSON reads::

        {"method": "fora" | "fora_lora" | "weight_projection" | "random" | "lora" | "l2sp" | "ewc" | "plain_ft",
         "metric": "exact_match", "global_step": int, "wall_s": float,
         "preserved": {"name", "path", "n", "before", "after"}, "new_task": {...}}

    ``method`` is :func:`trainer_method` of the trainer's callbacks (the names of ``cli.py compare``;
    ``plain_ft`` when none of them constrains the fit).

    The model is the first ``transformers.PreTrainedModel`` inside the LightningModule (so it works
    through :class:`~fora_lightning.ForaModule`); the tokenizer comes from ``tokenizer``, else the
    module's (or the wrapped module's, or the datamodule's) ``tokenizer`` attribute.

    Args:
        preserved / new_task: JSON-lines files with ``prompt_field`` and ``answer_field``.
        preserved_name / new_task_name: labels in the table.
        limit: score only the first ``limit`` records of each file.
    """

    def __init__(
        self,
        preserved: str,
        new_task: str,
        preserved_name: str = "preserved",
        new_task_name: str = "new task",
        prompt_field: str = "prompt",
        answer_field: str = "response",
        limit: int | None = None,
        batch_size: int = 64,
        max_new_tokens: int = 32,
        tokenizer: str | None = None,
        filename: str = "report",
    ) -> None:
        self.sets = {
            "preserved": (preserved_name, preserved),
            "new_task": (new_task_name, new_task),
        }
        self.prompt_field, self.answer_field, self.limit = prompt_field, answer_field, limit
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer_path = tokenizer
        self.filename = filename
        self.before: dict[str, ExactMatchResult] = {}
        self.result: dict[str, Any] | None = None
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self.before = self._evaluate(trainer, pl_module, "before")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        after = self._evaluate(trainer, pl_module, "after")
        self.result = {
            "method": trainer_method(trainer.callbacks),
            "metric": "exact_match",
            "global_step": trainer.global_step,
            "wall_s": round(time.perf_counter() - self._start, 1),
            **{
                role: {
                    "name": name,
                    "path": path,
                    "n": after[role].n,
                    "before": self.before[role].accuracy,
                    "after": after[role].accuracy,
                }
                for role, (name, path) in self.sets.items()
            },
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"report/{role}_{when}": self.result[role][when] for role in ROLES for when in ("before", "after")},
                step=trainer.global_step,
            )
        if trainer.is_global_zero:
            out = Path(trainer.log_dir or trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            table = format_table(self.result)
            (out / f"{self.filename}.json").write_text(json.dumps(self.result, indent=2) + "\n")
            (out / f"{self.filename}.md").write_text(table + "\n")
            print(f"\n{table}\n\nreport written to {out / self.filename}.json and .md", flush=True)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, when: str) -> dict[str, ExactMatchResult]:
        model = find_hf_model(pl_module)
        tokenizer = self._tokenizer(trainer, pl_module)
        scores: dict[str, ExactMatchResult] = {}
        for role, (name, path) in self.sets.items():
            prompts, answers = read_pairs(path, self.prompt_field, self.answer_field, self.limit)
            if trainer.is_global_zero:
                print(f"ExactMatchReport ({when}): greedy decoding {len(prompts)} {name} prompts", flush=True)
            scores[role] = evaluate_exact_match(
                model, tokenizer, prompts, answers, self.batch_size, self.max_new_tokens
            )
        return scores

    def _tokenizer(self, trainer: Trainer, pl_module: LightningModule):
        if self.tokenizer_path is not None:
            return AutoTokenizer.from_pretrained(self.tokenizer_path)
        for owner in (pl_module, getattr(pl_module, "module", None), trainer.datamodule):
            tok = getattr(owner, "tokenizer", None)
            if tok is not None:
                return tok
        raise ValueError(
            "ExactMatchReport: no tokenizer on the module, the wrapped module or the datamodule; pass tokenizer="
        )


def method_of(callback: Callback) -> str | None:
    """The method name (as ``cli.py compare`` names it) of ``callback``, ``None`` for a Callback that is no method.

    FORA is told apart by its basis source, FORA-LoRA with no bases is plain ``lora``; any other Callback names
    itself with a ``method_name`` class attribute (the baselines, the harness's PEFT peers).
    """
    if isinstance(callback, ForaLoRA):
        config = callback.config
        plain = (config.source, config.weight_rank) == tuple(PLAIN_LORA.values())
        return "lora" if plain else "fora_lora"
    if isinstance(callback, FORA):
        return _FORA_SOURCES[callback.config.source]
    return getattr(callback, "method_name", None)


def trainer_method(callbacks: Iterable[Callback]) -> str:
    """The method of a fit from its callbacks: the first that is a method, else ``"plain_ft"`` (no constraint)."""
    return next((m for cb in callbacks if (m := method_of(cb)) is not None), "plain_ft")


def find_hf_model(module: LightningModule) -> PreTrainedModel:
    """The outermost ``transformers.PreTrainedModel`` inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            return sub
    raise ValueError(f"ExactMatchReport: {type(module).__name__} holds no transformers PreTrainedModel")


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per role, exact match before -> after and the change (in points)."""
    lines = [
        f"Exact match, greedy decoding ({result['method']}, {result['global_step']} steps)",
        "",
        "| | task | n | before | after | change |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for role, label in (("preserved", "kept capability"), ("new_task", "new task")):
        r = result[role]
        lines.append(
            f"| {label} | {r['name']} | {r['n']} | {r['before']:.1%} | {r['after']:.1%} | {100 * (r['after'] - r['before']):+.1f} pt |"
        )
    return "\n".join(lines)
