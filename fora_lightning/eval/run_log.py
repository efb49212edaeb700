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

from fora_lightning.eval.setting import Setting


def setting_fingerprint(setting: Setting) -> str:
    """sha256 of the setting's fields that decide every run's numbers (a point's own arguments are stored beside it)."""
    fields = {k: v for k, v in asdict(setting).items() if k not in ("output_dir", "seed", "methods", "sweeps")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class RunLog:
    """``runs.jsonl`` in ``out``: :meth:`append` after each run, :meth:`done` to read back the reusable ones."""

    def __init__(self, out: Path, setting: Setting) -> None:
        self.path = Path(out) / "runs.jsonl"
        self.fingerprint = setting_fingerprint(setting)

    def append(self, key: str | None, seed: int | None, args: dict[str, Any] | None, numbers: dict[str, Any]) -> None:
        line = {"key": key, "seed": seed, "args": args, "fingerprint": self.fingerprint, "numbers": numbers}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")

    def done(self) -> tuple[dict[tuple[str | None, int | None], dict[str, Any]], int]:
        """``{(key, seed): {"args", "numbers"}}`` of this setting's lines (the last one wins), and how many were skipped
        because another setting made them."""
        found: dict[tuple[str | None, int | None], dict[str, Any]] = {}
        other = 0
        if not self.path.is_file():
            return found, other
        for text in self.path.read_text(encoding="utf-8").splitlines():
            if not text.strip():
                continue
            line = json.loads(text)
            if line.get("fingerprint") != self.fingerprint:
                other += 1
                continue
            found[(line["key"], line["seed"])] = {"args": line["args"], "numbers": line["numbers"]}
        return found, other

    def clear(self) -> None:
        """A fresh (not resumed) compare starts a new log."""
        self.path.unlink(missing_ok=True)
