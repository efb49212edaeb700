"""Command line: ``python cli.py fit --config configs/X.yaml`` (LightningCLI), plus ``inspect`` and ``compare``.

* ``fit`` / ``validate`` (``test`` / ``predict`` with modules that define them): LightningCLI in subclass mode (``model`` and ``data`` are
  ``class_path`` + ``init_args``, any LightningModule / LightningDataModule). ``${a.b.c}`` interpolations
  (OmegaConf, absolute paths from the config root, e.g. ``tokenizer: ${model.init_args.module.init_args.model}``)
  are resolved once every source is merged (jsonargparse's ``omegaconf+`` mode): a later ``--config`` overlay
  or a command-line override such as ``--model.init_args.module.init_args.model X`` reaches every key that
  interpolates it; overriding the interpolated key itself still wins. ``config.yaml`` (resolved values) is
  written to the log dir, overwriting an old one.
* ``inspect ...``: :func:`fora_lightning.inspect_subspaces.main` (look at a saved subspace file).
* ``compare ...``: :func:`experiments.compare.main` (FORA against the baselines: the repository's harness beside the
  library, so run it from a clone's root).

Under a ``max_steps`` budget the Rich progress bar reads ``Epoch 4`` (Lightning's own reads ``Epoch 4/-2``).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Any, NoReturn

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fora_lightning.trainer_progress import use_step_budget_bar

SUBCOMMANDS = {"inspect": "fora_lightning.inspect_subspaces", "compare": "experiments.compare"}  # compare: the harness


def main(argv: list[str] | None = None) -> Any:
    """Dispatch ``inspect`` / ``compare`` to their own parsers; anything else goes to LightningCLI (returned)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
    with _paths_from_subcommand_root():
        return ForaCLI(
            parser_class=ForaArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=argv,
        )


class ForaArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a FORA setting given flat under ``ForaModule``'s ``init_args`` is told to go in ``config``."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(flat_settings_hint(message) or message, ex)


class ForaCLI(LightningCLI):
    """LightningCLI with :class:`ForaArgumentParser`; its Rich progress bar reads ``Epoch 4``, not ``Epoch 4/-2``,
    under a ``max_steps`` budget."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_step_budget_bar(trainer)
        return trainer


def flat_settings_hint(message: str) -> str | None:
    """The error to show when jsonargparse refused a ForaConfig field given to ``ForaModule`` itself, else ``None``."""
    from fora_lightning.config import ForaConfig

    if "ForaModule" not in message:
        return None
    found = re.search(r"Option '(\w+)' is not accepted", message)
    if found is None or found.group(1) not in _setting_names(ForaConfig()):
        return None
    name = found.group(1)
    return (
        f"FORA: '{name}' is a FORA setting (fora_lightning.ForaConfig): under ForaModule's init_args it goes inside "
        f"'config:' (init_args: {{module: ..., config: {{{name}: ...}}}}); on the command line "
        f"--model.init_args.config.{name} VALUE\n\njsonargparse said:\n{message}"
    )


def _setting_names(config: Any) -> set[str]:
    """The field names of a settings dataclass instance, those of its nested groups included."""
    names = set()
    for f in fields(config):
        names.add(f.name)
        value = getattr(config, f.name)
        if is_dataclass(value):
            names |= _setting_names(value)
    return names


@contextmanager
def _paths_from_subcommand_root() -> Iterator[None]:
    """``omegaconf+`` resolves on the whole parse, whose root holds the subcommand (``fit.model...``); a config file's
    ``${model...}`` means its own root, so jsonargparse rewrites such paths relative to the node holding them."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        yield
    finally:
        set_parsing_settings(omegaconf_absolute_to_relative_paths=False)  # jsonargparse's default


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
