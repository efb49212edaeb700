"""Token ids with response-only labels, and dynamic padding of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def encode_pairs(
    batch: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    add_bos: bool = True,
    append_eos: bool = True,
) -> dict[str, list[list[int]]]:
    """``input_ids = [bos] + prompt + response + [eos]``, ``labels`` = ``-100`` on ``[bos] + prompt``.

    Prompt and response are tokenised separately (no special tokens), so the boundary is exact;
    ``bos``/``eos`` are added only when the tokenizer has them. Sequences are cut at ``max_length``
    (from the right); a row whose response is cut away entirely keeps no label (filter it out).
    """
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for p, r in zip(prompts, responses):
        context = bos + p
        target = r + eos
        input_ids.append((context + target)[:max_length])
        labels.append(([IGNORE_INDEX] * len(context) + target)[:max_length])
    return {"input_ids": input_ids, "labels": labels}


class PadCollator:
    """Pad a list of examples to the longest one (right padding).

    ``input_ids`` get ``pad_id``, ``labels`` get ``-100``, and ``attention_mask`` is 1 on real tokens.
    With ``labels=False`` the batch holds only ``input_ids`` and ``attention_mask`` (calibration).
    """

    def __init__(self, pad_id: int, labels: bool = True, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.labels = labels
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(examples)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.as_tensor(e["input_ids"])
            attention_mask[i, :k] = 1
            if self.labels:
                labels[i, :k] = torch.as_tensor(e["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.labels:
            batch["labels"] = labels
        return batch
