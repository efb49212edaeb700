"""TextDataModule on local files: token-by-token masking and padding, held-out splits, data errors."""

from __future__ import annotations

import os

import pytest
from tiny_lm import keep_rows, save_tokenizer, task_rows, tid, write_jsonl

from fora_lightning.llm import TextDataModule, TextSource
from fora_lightning.llm.encoding import IGNORE_INDEX

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture
def files(tmp_path):
    return {
        "tok": save_tokenizer(tmp_path / "tok"),
        "task": write_jsonl(tmp_path / "task.jsonl", task_rows(24)),
        "keep": write_jsonl(tmp_path / "keep.jsonl", keep_rows(20)),
        "cache": str(tmp_path / "cache"),
    }


def make(files, **kw) -> TextDataModule:
    args = dict(
        tokenizer=files["tok"],
        task=TextSource(files["task"]),
        batch_size=4,
        cache_dir=files["cache"],
        preserve=TextSource(files["keep"], prompt_field="question", response_field="answer"),
    )
    args.update(kw)
    return TextDataModule(**args)


def test_masking_and_padding_token_by_token(files, tmp_path):
    rows = [{"prompt": "add a b =", "response": "c"}, {"prompt": "translate one :", "response": "a b c d"}]
    two = TextSource(write_jsonl(tmp_path / "two.jsonl", rows))
    dm = make(files, task=two, task_val=two, preserve=None, eval_batch_size=2)
    (loader,) = dm.val_dataloader()
    batch = next(iter(loader))
    pad, bos, eos = tid("[PAD]"), tid("[BOS]"), tid("[EOS]")
    first = [bos, tid("add"), tid("a"), tid("b"), tid("="), tid("c"), eos]
    second = [bos, tid("translate"), tid("one"), tid(":"), tid("a"), tid("b"), tid("c"), tid("d"), eos]
    assert batch["input_ids"].tolist() == [first + [pad, pad], second]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0, 0], [1] * 9]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [m, m, m, m, m, tid("c"), eos, m, m],
        [m, m, m, m, tid("a"), tid("b"), tid("c"), tid("d"), eos],
    ]


def test_templates_split_and_label_free_calibration(files):
    dm = make(
        files,
        preserve=TextSource(files["keep"], prompt_template="{question} ", response_template="{answer}"),
        task_val_size=4,
        preserve_val_size=0.25,
        calibration_batch_size=5,
    )
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["task_val"])) == (20, 4)
    assert (len(dm.splits["calibration"]), len(dm.splits["preserve_val"])) == (15, 5)
    assert dm.val_dataloader_names == ["task", "preserve"]
    assert len(dm.val_dataloader()) == 2
    batches = list(dm.calibration_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 5]
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    # the held-out preserved rows are not among the calibration rows
    held = {tuple(r["input_ids"]) for r in dm.splits["preserve_val"]}
    assert held.isdisjoint(tuple(r["input_ids"]) for r in dm.splits["calibration"])


def test_tokenisation_is_cached_by_datasets(files):
    first = make(files)
    first.setup()
    second = make(files)
    second.setup()
    names = [f["filename"] for f in first.splits["train"].cache_files]
    assert names and names == [f["filename"] for f in second.splits["train"].cache_files]
    assert all(n.startswith(files["cache"]) for n in names)


def test_missing_file(files, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make(files, task=TextSource(missing)).setup()


def test_missing_field(files):
    with pytest.raises(KeyError, match=r"preserve.*keep.jsonl.*response_field reads column 'answr'"):
        make(files, preserve=TextSource(files["keep"], prompt_field="question", response_field="answr")).setup()
    with pytest.raises(KeyError, match=r"prompt_template .*'questn'"):
        make(files, preserve=TextSource(files["keep"], prompt_template="{questn}", response_field="answer")).setup()


def test_empty_split(files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"task: '.*empty.jsonl'.*(empty|no data|0 rows)"):
        make(files, task=TextSource(str(empty))).setup()


def test_held_out_part_must_leave_rows(files):
    with pytest.raises(ValueError, match=r"preserve: preserve_val_size=20 holds out 20 of 20 rows"):
        make(files, preserve_val_size=20).setup()


def test_rows_truncated_to_no_response(files):
    with pytest.raises(ValueError, match="max_length=3"):
        make(files, max_length=3, preserve=None).setup()
