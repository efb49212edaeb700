"""Chat rows (``messages``: a list of ``{"role", "content"}``) rendered by the tokenizer's chat template.

Training labels sit on assistant turns only; calibration rows are label-free (the prompts, optionally with the
answers the data holds).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from fora_lightning.llm.encoding import IGNORE_INDEX

Message = dict[str, str]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool = False) -> str:
    """``tokenizer.apply_chat_template`` as text (``""`` for no message)."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the rendered conversation and, per assistant turn ``i``, its character span.

    The span of turn ``i`` is ``[len(render(m[:i], generation prompt)), len(render(m[:i + 1])))``: the answer and
    the template's end-of-turn markup, not the assistant header. Each prefix rendering must be a prefix of the whole
    text (templates that rewrite earlier turns, e.g. drop past reasoning, are refused).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text, end_text = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1])
        for prefix in (start_text, end_text):
            if not text.startswith(prefix):
                raise ValueError(
                    f"chat template of {tokenizer.name_or_path!r}: rendering the first {i + 1} messages is not a prefix of "
                    f"the whole conversation ({prefix[-60:]!r} vs {text[len(prefix) - 60 : len(prefix)]!r}), so the "
                    "assistant turns cannot be located; use a template that renders turns left to right"
                )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_chats(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, max_length: int, include_assistant: bool = True
) -> dict[str, list[list[int]]]:
    """Token ids of each rendered conversation (cut at ``max_length``) and its labels.

    ``include_assistant=True``: the whole conversation, labels = ids on tokens that start inside an assistant span
    (:func:`assistant_spans`), ``-100`` elsewhere. ``include_assistant=False``: the non-assistant turns followed by
    the generation prompt (label-free calibration prompts), every token labelled. No bos/eos is added: the template
    owns the markup.
    """
    input_ids, labels = [], []
    for messages in batch["messages"]:
        if include_assistant:
            text, spans = assistant_spans(tokenizer, messages)
        else:
            text = render(tokenizer, [m for m in messages if m["role"] != "assistant"], True)
            spans = [(0, len(text))]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_length]
        starts = [s for s, _ in enc["offset_mapping"][:max_length]]
        inside = [any(a <= s < b for a, b in spans) for s in starts]
        input_ids.append(ids)
        labels.append([t if keep else IGNORE_INDEX for t, keep in zip(ids, inside)])
    return {"input_ids": input_ids, "labels": labels}
