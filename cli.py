"""Command line: ``python cli.py fit --config configs/X.yaml`` (LightningCLI), plus ``inspect`` and ``compare``.

* ``fit`` / ``validate`` (``test`` / ``predict`` with modules that define them): LightningCLI in subclass mode (``model`` and ``data`` are
  ``class_path`` + ``init_args``, any LightningModule / LightningDataModule). ``${a.b.c}`` interpolations
  (OmegaConf, absolute paths from the config root, e.g. ``tokenizer: ${model.init_args.module.init_args.model}``)
  are resolved once every source is merged (jsonargparse's ``omegaconf+`` mode): a later ``--config`` overlay
  or a command-line override such as ``--model.init_args.module.init_args.model X`` reaches every key that
  interpolates it; overriding the interpolated key itself still wins. ``config.yaml`` (resolved values) is
  written to the log dir, overwriting an old one.
* ``inspect ...``: :func:`fora_lightning.inspect_subspaces.main` (look at a saved subspace file).
* ``compare ...``: :func:`fora_lightning.eval.compare.main` (FORA against the baselines).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = {"inspect": "fora_lightning.inspect_subspaces", "compare": "fora_lightning.eval.compare"}


def main(argv: list[str] | None = None) -> Any:
    """Dispatch ``inspect`` / ``compare`` to their own parsers; anything else goes to LightningCLI (returned)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
    with _paths_from_subcommand_root():
        return LightningCLI(
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=argv,
        )


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
