"""Offline helpers for the LLM tests: a word-level tokenizer, a 2-layer Llama config, JSONL files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = "translate add to : = a b c d e f g h one two three four five plus is the cat dog sat".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: id = position in SPECIALS + WORDS, so tests can spell ids out."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tid(word: str) -> int:
    """The id of ``word`` in :func:`word_tokenizer`."""
    return (SPECIALS + WORDS).index(word)


def save_tokenizer(directory: Path) -> str:
    word_tokenizer().save_pretrained(directory)
    return str(directory)


def tiny_llama_config(vocab_size: int = len(SPECIALS) + len(WORDS)) -> dict[str, Any]:
    """An inline ``AutoConfig.for_model`` dict: Llama, hidden 32, 2 layers."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_rows(n: int = 24) -> list[dict[str, str]]:
    """The 'new task': 'add a b' -> 'c' style rows (prompt / response fields)."""
    letters = "abcdefgh"
    return [
        {"prompt": f"add {letters[i % 8]} {letters[(i + 1) % 8]} =", "response": letters[(i * 3) % 8]} for i in range(n)
    ]


def keep_rows(n: int = 24) -> list[dict[str, str]]:
    """The capability to keep: 'translate one' -> 'a' style rows (question / answer fields)."""
    nums = ["one", "two", "three", "four", "five"]
    return [
        {"question": f"translate {nums[i % 5]} {'abcdefgh'[(i // 5) % 8]} :", "answer": "abcde"[i % 5]}
        for i in range(n)
    ]


# ChatML, as SmolLM2 and Qwen write it (without a default system prompt)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_WORDS = ["system", "user", "assistant", "be", "brief", "hi", "hello", "bye", "ok"]


def chat_word_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`word_tokenizer` plus ChatML: ids = position in SPECIALS + WORDS + CHAT_SPECIALS + CHAT_WORDS."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + CHAT_SPECIALS + CHAT_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        additional_special_tokens=CHAT_SPECIALS,
    )
    fast.chat_template = CHATML
    return fast


def chat_tid(word: str) -> int:
    """The id of ``word`` in :func:`chat_word_tokenizer`."""
    return (SPECIALS + WORDS + CHAT_SPECIALS + CHAT_WORDS).index(word)


def chat_bpe_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on ``texts`` (merges cross the turn boundaries), with ChatML."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", *CHAT_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", additional_special_tokens=CHAT_SPECIALS
    )
    fast.chat_template = CHATML
    return fast
