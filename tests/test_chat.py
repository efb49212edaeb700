"""Chat rows: the chat template renders them, labels on assistant turns only, label-free calibration prompts."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_lm import chat_bpe_tokenizer, chat_tid, chat_word_tokenizer, keep_rows, write_jsonl

from fora_lightning.llm import TextDataModule, TextSource
from fora_lightning.llm.chat import encode_chats
from fora_lightning.llm.encoding import IGNORE_INDEX

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

TALK = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture
def chat_files(tmp_path):
    tok = tmp_path / "tok"
    chat_word_tokenizer().save_pretrained(tok)
    return {
        "tok": str(tok),
        "chat": write_jsonl(tmp_path / "chat.jsonl", [{"messages": TALK, "id": 7}]),
        "keep": write_jsonl(tmp_path / "keep.jsonl", keep_rows(6)),
        "cache": str(tmp_path / "cache"),
    }


def _ids(words: str) -> list[int]:
    return [chat_tid(w) for w in words.split()]


def make(files, **kw) -> TextDataModule:
    args = dict(
        tokenizer=files["tok"], task=TextSource(files["chat"], messages_field="messages"), cache_dir=files["cache"]
    )
    return TextDataModule(**(args | kw))


def test_chat_row_labels_are_the_assistant_turns_token_by_token(chat_files):
    dm = make(chat_files, preserve=TextSource(chat_files["chat"], messages_field="messages"), preserve_val_size=0)
    dm.setup("fit")
    row = dm.splits["train"][0]
    s, e = "<|im_start|>", "<|im_end|>"
    assert row["input_ids"] == _ids(
        f"{s} system be brief {e} {s} user hi {e} {s} assistant hello {e} {s} user bye {e} {s} assistant ok {e}"
    )
    m = IGNORE_INDEX
    assert row["labels"] == [m] * 11 + _ids(f"hello {e}") + [m] * 6 + _ids(f"ok {e}")
    (calibration,) = list(dm.calibration_dataloader())  # include_assistant=True: the answers the data holds
    assert calibration["input_ids"].tolist() == [row["input_ids"]] and "labels" not in calibration


def test_chat_calibration_without_assistant_turns_is_the_prompt(chat_files):
    source = TextSource(chat_files["chat"], messages_field="messages", include_assistant=False)
    dm = make(chat_files, preserve=source, preserve_val_size=0)
    (batch,) = list(dm.calibration_dataloader())
    s, e = "<|im_start|>", "<|im_end|>"
    assert batch["input_ids"].tolist() == [
        _ids(f"{s} system be brief {e} {s} user hi {e} {s} user bye {e} {s} assistant")
    ]


def test_preserve_list_mixes_plain_prompts_and_chats(chat_files):
    plain = TextSource(chat_files["keep"], prompt_field=None, response_field="question")
    chat = TextSource(chat_files["chat"], messages_field="messages")
    dm = make(chat_files, preserve=[plain, chat], preserve_val_size=0)
    dm.setup()
    rows = dm.splits["calibration"]["input_ids"]
    assert len(rows) == 7 and sum(r[0] == chat_tid("<|im_start|>") for r in rows) == 1
    assert sum(r[0] == chat_tid("[BOS]") for r in rows) == 6  # plain rows keep bos/eos, chat rows take the template's


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["hi", "say hi\n", " two words", "x=1, y=2"]),
            st.sampled_from(["hello", "ok!", " bye\n\n", "42"]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_byte_level_labels_decode_to_exactly_the_answers(turns):
    """A trained BPE whose merges cross turn boundaries: each labelled run decodes to one answer + end of turn."""
    messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    tok = BPE
    out = encode_chats({"messages": [messages]}, tok, max_length=10_000)
    ids, labels = out["input_ids"][0], out["labels"][0]
    runs, current = [], []
    for t, y in zip(ids, labels):
        if y == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert y == t
            current.append(t)
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>\n" for _, a in turns]
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)


BPE = chat_bpe_tokenizer(
    ["<|im_start|>user\nsay hi\n<|im_end|>\n<|im_start|>assistant\nhello ok! bye\n\n42 x=1, y=2 two words"] * 20
)


def test_chat_errors_name_the_fix(chat_files, tmp_path):
    with pytest.raises(KeyError, match="set messages_field: messages"):
        make(chat_files, task=TextSource(chat_files["chat"])).setup()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(ValueError, match="row 0.*role in"):
        make(chat_files, task=TextSource(bad, messages_field="messages")).setup()
    plain = tmp_path / "plain"
    tok = chat_word_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(plain)
    with pytest.raises(ValueError, match="needs a chat template"):
        make(chat_files, tokenizer=str(plain)).setup()
    unstable = chat_word_tokenizer()
    unstable.chat_template = "{{ messages | length }} " + unstable.chat_template
    with pytest.raises(ValueError, match="not a prefix"):
        encode_chats({"messages": [TALK]}, unstable, max_length=64)


def test_setup_after_prepare_data_reads_the_cache(chat_files):
    """prepare_data (rank 0) tokenises into the cache and keeps no state; setup on a fresh module (another rank) adds nothing."""
    kw = dict(preserve=TextSource(chat_files["chat"], messages_field="messages"), preserve_val_size=0)
    first = make(chat_files, **kw)
    first.prepare_data()
    assert first.splits is None
    cache = chat_files["cache"]
    files = {os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs}
    assert any(f.endswith(".arrow") for f in files)
    other = make(chat_files, **kw)
    other.setup("fit")
    assert {os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs} == files
    assert all(c["filename"] in files for c in other.splits["train"].cache_files)
    assert other.splits["train"][0]["labels"].count(IGNORE_INDEX) == 17
