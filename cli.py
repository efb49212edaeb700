"""Command line: ``python cli.py fit --config configs/X.yaml`` (LightningCLI), plus ``inspect`` and ``compare``.

* ``fit`` / ``validate`` (``test`` / ``predict`` with modules that define them): LightningCLI in subclass mode (``model`` and ``data`` are
  ``class_path`` + ``init_args``, any LightningModule / LightningDataModule), YAML read with OmegaConf so
  ``${model.init_args.module.init_args.model}``-style interpolation works (resolved when the file is read, so
  a command-line override of the source key does not reach the interpolated one); command-line overrides such
  as ``--trainer.max_steps 10`` apply on top. ``config.yaml`` is written to the log dir, overwriting an old one.
* ``inspect ...``: :func:`fora_lightning.inspect_subspaces.main` (look at a saved subspace file).
* ``compare ...``: :func:`fora_lightning.eval.compare.main` (FORA against the baselines).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = {"inspect": "fora_lightning.inspect_subspaces", "compare": "fora_lightning.eval.compare"}


def main(argv: list[str] | None = None) -> Any:
    """Dispatch ``inspect`` / ``compare`` to their own parsers; anything else goes to LightningCLI (returned)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
    return LightningCLI(
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
