"""The compare runs already done, kept in ``runs.jsonl`` beside the outputs so that ``compare --resume`` skips them.

One JSON line per finished run: the point's key, seed and arguments, a fingerprint of everything else that decides
the result (the setting without ``output_dir``, ``seed``, ``methods`` and ``sweeps``: the arguments are the
point's own), and the run's numbers. A line whose fingerprint or
arguments differ from this invocation's is not reused (that run is trained again), so a resumed table never mixes
runs of different settings. The base model's scores are a line of their own (``key`` ``None``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.setting import Setting


def setting_fingerprint(setting: Setting) -> str:
    """sha256 of the setting's fields that decide every run's numbers (a point's own arguments are stored beside it)."""
    fields = {k: v for k, v in asdict(setting).items() if k not in ("output_dir", "seed", "methods", "sweeps")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class RunLog:
    """``runs.jsonl`` in ``out``. ``resume``: read this setting's lines back (:meth:`numbers`); otherwise start a
    new log. ``other``: lines skipped because another setting made them."""

    def __init__(self, out: Path, setting: Setting, resume: bool) -> None:
        self.path = Path(out) / "runs.jsonl"
        self.fingerprint = setting_fingerprint(setting)
        self.other = 0
        self._done: dict[tuple[str | None, int | None], dict[str, Any]] = {}
        if not resume:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            for text in self.path.read_text(encoding="utf-8").splitlines():
                if not text.strip():
                    continue
                line = json.loads(text)
                if line.get("fingerprint") != self.fingerprint:
                    self.other += 1
                    continue
                self._done[(line["key"], line["seed"])] = line  # the last line of a run wins

    def numbers(self, key: str | None, seed: int | None, args: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The logged numbers of run ``(key, seed)`` if it was made with these ``args`` (compared as logged), else ``None``."""
        line = self._done.get((key, seed))
        if line is None or line["args"] != json.loads(json.dumps(args, default=str)):
            return None
        return line["numbers"]

    def append(self, key: str | None, seed: int | None, args: dict[str, Any] | None, numbers: dict[str, Any]) -> None:
        """Log one finished run (``key`` and ``seed`` ``None``: the base model's scores)."""
        line = {"key": key, "seed": seed, "args": args, "fingerprint": self.fingerprint, "numbers": numbers}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
