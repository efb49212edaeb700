"""Where text examples come from: a hub dataset or local files, turned into ``prompt`` / ``response`` columns
(or one ``messages`` column of chat turns)."""

from __future__ import annotations

import glob
import string
from dataclasses import dataclass
from pathlib import Path

import datasets

LOCAL_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


@dataclass
class TextSource:
    """One dataset of prompt/response pairs.

    Args:
        path: local file, directory or glob (``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt``), or a hub
            dataset name (e.g. ``openai/gsm8k``).
        name: hub configuration (``main`` for GSM8K, ``fr-en`` for WMT14).
        split: split to read; local files form a single ``train`` split (slices such as ``train[:500]`` work).
        prompt_field / response_field: columns holding the prompt and the response. ``prompt_field=None``
            means an empty prompt (every token is trained on), e.g. for ``.txt`` files with ``response_field: text``.
        prompt_template / response_template: ``str.format`` templates over a row, used instead of the field,
            e.g. ``"Question: {question}\\nAnswer: "``; nested columns as ``"{translation[en]}"``.
        limit: keep only the first ``limit`` rows.
        messages_field: column of chat conversations (lists of ``{"role", "content"}``, the OpenAI/HF format),
            rendered by the tokenizer's chat template; the prompt/response fields are then unused and the
            loss is on assistant turns only.
        include_assistant: with ``messages_field``: keep the assistant turns (e.g. the base model's own answers
            in calibration data); ``False`` keeps only the other turns followed by the generation prompt.
    """

    path: str
    name: str | None = None
    split: str = "train"
    prompt_field: str | None = "prompt"
    response_field: str | None = "response"
    prompt_template: str | None = None
    response_template: str | None = None
    limit: int | None = None
    messages_field: str | None = None
    include_assistant: bool = True


ROLES = ("system", "user", "assistant", "tool")


def describe(source: TextSource) -> str:
    """``'file.jsonl'`` or ``'openai/gsm8k' (main, split test)`` for error messages."""
    extra = ", ".join(x for x in (source.name, f"split {source.split}") if x)
    return f"{source.path!r} ({extra})"


def local_files(path: str) -> tuple[str, list[str]] | None:
    """``(builder, files)`` when ``path`` names local files, ``None`` for a hub name.

    Raises ``FileNotFoundError`` for a path that looks local (known suffix, glob, ``./``, ``/``, ``~``) but matches nothing.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in LOCAL_FORMATS)
        if not files:
            raise FileNotFoundError(f"directory {path!r} holds no {'/'.join(LOCAL_FORMATS)} file")
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(str(p)))
        if not files:
            raise FileNotFoundError(f"no file matches the pattern {path!r}")
    elif p.suffix in LOCAL_FORMATS or path.startswith((".", "/", "~")):
        if not p.is_file():
            raise FileNotFoundError(f"no such data file: {path!r} (resolved to {p.resolve()})")
        files = [str(p)]
    else:
        return None
    builders = {LOCAL_FORMATS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{path!r}: files must share one format among {sorted(LOCAL_FORMATS)}, got {files[:5]}")
    return builders.pop(), files


def template_fields(template: str) -> list[str]:
    """The row columns a ``str.format`` template reads: ``"{translation[en]} {q}"`` -> ``['translation', 'q']``."""
    roots = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            root = field.split("[", 1)[0].split(".", 1)[0]
            if not root or root.isdigit():
                raise ValueError(f"template {template!r}: use named fields such as {{question}}, not {{{field}}}")
            roots.append(root)
    return roots


def load_source(source: TextSource, role: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Load ``source`` and return a dataset with exactly the columns ``prompt`` and ``response``.

    ``role`` (``task``, ``preserve``, ...) prefixes every error, which also names the file and the field.
    """
    where = f"TextDataModule {role}: {describe(source)}"
    if source.messages_field is None and source.response_field is None and source.response_template is None:
        raise ValueError(f"{where}: give response_field or response_template")
    local = local_files(source.path)
    try:
        if local is not None:
            ds = datasets.load_dataset(local[0], data_files=local[1], split=source.split, cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(source.path, source.name, split=source.split, cache_dir=cache_dir)
    except StopIteration as e:  # what the json builder raises for a file without rows
        raise ValueError(f"{where}: the split is empty (0 rows)") from e
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{where}: could not load: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"{where}: the split is empty (0 rows)")
    if source.limit is not None:
        ds = ds.select(range(min(source.limit, len(ds))))
    if source.messages_field is not None:
        return _chat_rows(ds, source.messages_field, where, role)

    def needed(field: str | None, template: str | None, what: str) -> list[tuple[str, str]]:
        if template is not None:
            return [(f, f"{what}_template {template!r}") for f in template_fields(template)]
        return [] if field is None else [(field, f"{what}_field")]

    for column, origin in needed(source.prompt_field, source.prompt_template, "prompt") + needed(
        source.response_field, source.response_template, "response"
    ):
        if column not in ds.column_names:
            hint = "; for chat rows set messages_field: messages" if "messages" in ds.column_names else ""
            raise KeyError(
                f"{where}: {origin} reads column {column!r}, which is missing; columns: {ds.column_names}{hint}"
            )

    def text(row: dict, field: str | None, template: str | None) -> str:
        if template is not None:
            return template.format(**row)
        return "" if field is None else str(row[field])

    def to_pair(row: dict) -> dict[str, str]:
        return {
            "prompt": text(row, source.prompt_field, source.prompt_template),
            "response": text(row, source.response_field, source.response_template),
        }

    return ds.map(to_pair, remove_columns=ds.column_names, desc=f"{role}: format")


def _chat_rows(ds: datasets.Dataset, field: str, where: str, role: str) -> datasets.Dataset:
    """The column ``messages``: each row a non-empty list of ``{"role", "content"}`` with a known role."""
    if field not in ds.column_names:
        raise KeyError(f"{where}: messages_field reads column {field!r}, which is missing; columns: {ds.column_names}")

    def check(row: dict, index: int) -> dict[str, list[dict[str, str]]]:
        turns = row[field]
        if not isinstance(turns, list) or not turns:
            raise ValueError(
                f"{where}: row {index}: {field!r} must be a non-empty list of {{'role', 'content'}}, got {turns!r:.80}"
            )
        out = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise ValueError(
                    f"{where}: row {index}: turn {turn!r:.80} needs a role in {ROLES} and a string content "
                    "(the OpenAI/HF chat format)"
                )
            out.append({"role": turn["role"], "content": turn["content"]})
        return {"messages": out}

    return ds.map(check, with_indices=True, remove_columns=ds.column_names, desc=f"{role}: chat rows")
