"""Exact-match accuracy of greedy generations over prompt/answer pairs (any Hugging Face causal LM)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fora_lightning.metrics import normalize_whitespace


def exact_match(
    predictions: Sequence[str], references: Sequence[str], normalize: Callable[[str], str] = normalize_whitespace
) -> float:
    """Fraction of predictions equal to their reference after ``normalize`` (0.0 for empty inputs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / len(references)


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), decoded without special tokens.

    The prompts are tokenized as training tokenizes them (``add_special_tokens=True``). The model is
    put in eval mode for the call and given back in the mode it was in.
    """
    was_training = model.training
    side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


@torch.no_grad()
def greedy_extend(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    synced: bool = False,
    samples: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row followed by the model's own greedy continuation (up to ``max_new_tokens``, through its first EOS).
    ``samples > 0``: every row ``samples`` times (consecutive), each followed by a continuation sampled from the
    model's own distribution (temperature 1, no top-k/top-p; the caller seeds torch's RNG).

    Rows come right-padded (``attention_mask`` 1 on real tokens, as :class:`~fora_lightning.llm.encoding.PadCollator`
    makes them); a trailing EOS is dropped first (a prompt that ends the text has nothing to continue). The rows are
    generated left-padded in one batched ``model.generate`` call and returned right-padded: ``(input_ids,
    attention_mask)``. ``synced``: ``synced_gpus=True`` (every rank runs the same number of forwards, as FSDP needs).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = [ids[m.bool()] for ids, m in zip(input_ids, mask, strict=True)]
    rows = [r[:-1] if eos_token_id is not None and r.numel() > 1 and int(r[-1]) == eos_token_id else r for r in rows]
    width = max(r.numel() for r in rows)
    left = input_ids.new_full((len(rows), width), pad_token_id)
    left_mask = torch.zeros_like(left)
    for i, r in enumerate(rows):
        left[i, width - r.numel() :], left_mask[i, width - r.numel() :] = r, 1
    was_training = model.training
    model.eval()
    try:
        generated = model.generate(
            input_ids=left,
            attention_mask=left_mask,
            max_new_tokens=max_new_tokens,
            **(
                {"do_sample": True, "num_return_sequences": samples, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                if samples > 0
                else {"do_sample": False}
            ),
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            synced_gpus=synced,
        )
    finally:
        model.train(was_training)
    if samples > 0:
        rows = [r for r in rows for _ in range(samples)]
    out = []
    for r, new in zip(rows, generated[:, width:], strict=True):
        stop = (new == eos_token_id).nonzero() if eos_token_id is not None else new[:0]
        out.append(torch.cat([r, new[: int(stop[0]) + 1] if stop.numel() else new]))
    longest = max(o.numel() for o in out)
    ids = input_ids.new_full((len(out), longest), pad_token_id)
    new_mask = torch.zeros_like(ids)
    for i, o in enumerate(out):
        ids[i, : o.numel()], new_mask[i, : o.numel()] = o, 1
    return ids, new_mask


@dataclass
class ExactMatchResult:
    """Accuracy over ``n`` items, with the generations kept for inspection."""

    accuracy: float
    n: int
    predictions: list[str] = field(default_factory=list)


def evaluate_exact_match(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> ExactMatchResult:
    """Greedy-decode every prompt and score exact match against its answer."""
    predictions = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return ExactMatchResult(exact_match(predictions, answers), len(answers), predictions)


def read_pairs(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "response", limit: int | None = None
) -> tuple[list[str], list[str]]:
    """Prompts and answers from a JSON-lines file (the first ``limit`` records when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    prompts: list[str] = []
    answers: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(prompts) >= limit:
                break
            record = json.loads(line)
            missing = [k for k in (prompt_field, answer_field) if k not in record]
            if missing:
                raise KeyError(f"{path}:{line_no} has no field {missing[0]!r} (fields: {sorted(record)})")
            prompts.append(str(record[prompt_field]))
            answers.append(str(record[answer_field]))
    if not prompts:
        raise ValueError(f"{path} holds no records")
    return prompts, answers
