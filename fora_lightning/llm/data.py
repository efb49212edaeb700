"""TextDataModule: the new task's data and the kept capability's calibration data, on ``datasets``."""

from __future__ import annotations

from functools import partial

import datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from typing_extensions import override

from fora_lightning.llm.chat import encode_chats
from fora_lightning.llm.encoding import IGNORE_INDEX, PadCollator, encode_pairs
from fora_lightning.llm.sources import TextSource, describe, load_source


class TextDataModule(LightningDataModule):
    """Tokenised prompt/response data for fine-tuning a causal LM with FORA.

    * ``train_dataloader``: the new task (``task``), shuffled, labels on response tokens only.
    * ``val_dataloader``: a list, named by :attr:`val_dataloader_names`: ``task`` (``task_val``, or
      ``task_val_size`` rows held out of ``task``) and ``preserve`` (``preserve_val_size`` rows held out of
      ``preserve``), each present when non-empty.
    * ``calibration_dataloader``: the rest of ``preserve`` (at most ``calibration_size`` rows), batches with
      ``input_ids`` and ``attention_mask`` only; the FORA Callback reads it.

    Rows are prompt/response pairs, or chat conversations (``TextSource(messages_field=...)``) rendered by the
    tokenizer's chat template with labels on assistant turns only. ``preserve`` may be a list of sources
    (e.g. plain prompts and chat conversations), concatenated and shuffled with ``seed``.

    :meth:`prepare_data` (rank 0) downloads, formats and tokenises into the ``datasets`` cache (``cache_dir``);
    :meth:`setup` (every rank) builds the same splits from that cache. Batches are padded to their longest row.

    Args:
        tokenizer: hub name or local directory of the model's tokenizer.
        task / preserve / task_val: :class:`TextSource` of the new task, the capability to keep (one source or a
            list), and an optional separate validation set of the new task.
        task_val_size / preserve_val_size: rows held out for validation (int), or a fraction (float < 1); 0: none.
        calibration_size: cap on calibration rows. max_length: tokens per row (right truncation).
        add_bos / append_eos: add the tokenizer's ``bos``/``eos`` around each row (when it has them).
    """

    def __init__(
        self,
        tokenizer: str,
        task: TextSource,
        preserve: TextSource | list[TextSource] | None = None,
        task_val: TextSource | None = None,
        task_val_size: int | float = 0,
        preserve_val_size: int | float = 0.2,
        calibration_size: int | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        calibration_batch_size: int | None = None,
        num_workers: int = 0,
        add_bos: bool = True,
        append_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task_val is not None and task_val_size:
            raise ValueError("TextDataModule: give task_val or task_val_size, not both")
        self.tokenizer_path = tokenizer
        self.task, self.task_val = _as_source(task), _as_source(task_val)
        self.preserve = (
            [_as_source(s) for s in preserve] if isinstance(preserve, (list, tuple)) else _as_source(preserve)
        )
        if self.preserve == []:
            raise ValueError("TextDataModule: preserve=[] holds no source; give at least one TextSource or None")
        self.task_val_size = task_val_size
        self.preserve_val_size = preserve_val_size
        self.calibration_size = calibration_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.calibration_batch_size = calibration_batch_size or self.eval_batch_size
        self.num_workers = num_workers
        self.add_bos = add_bos
        self.append_eos = append_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.cache_dir = cache_dir
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, datasets.Dataset] | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use; ``pad`` falls back to ``eos`` when it has none."""
        if self._tokenizer is None:
            tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
            if tok.pad_token_id is None:
                if tok.eos_token_id is None:
                    raise ValueError(
                        f"TextDataModule: tokenizer {self.tokenizer_path!r} has neither a pad nor an eos token"
                    )
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    # ------------------------------------------------------------------ building the splits
    @override
    def prepare_data(self) -> None:
        """Download, format and tokenise every source into the ``datasets`` cache; keeps no state (rank 0 only)."""
        self._build()

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the splits (from the cache :meth:`prepare_data` filled, when it ran); idempotent."""
        if self.splits is None:
            self.splits = self._build()

    def _build(self) -> dict[str, datasets.Dataset]:
        splits: dict[str, datasets.Dataset] = {}
        task = self._encode(self.task, "task")
        if self.task_val is not None:
            splits["task_val"] = self._encode(self.task_val, "task_val")
        elif self.task_val_size:
            task, splits["task_val"] = self._hold_out(task, self.task_val_size, "task", "task_val_size")
        splits["train"] = task
        if self.preserve is not None:
            keep = self._encode_preserve()
            if self.preserve_val_size:
                keep, splits["preserve_val"] = self._hold_out(
                    keep, self.preserve_val_size, "preserve", "preserve_val_size"
                )
            if self.calibration_size is not None:
                keep = keep.select(range(min(self.calibration_size, len(keep))))
            splits["calibration"] = keep
        return splits

    def _encode_preserve(self) -> datasets.Dataset:
        """One source as is; several: concatenated and shuffled with ``seed``."""
        if isinstance(self.preserve, TextSource):
            return self._encode(self.preserve, "preserve")
        parts = [self._encode(s, f"preserve[{i}]") for i, s in enumerate(self.preserve)]
        return datasets.concatenate_datasets(parts).shuffle(seed=self.seed) if len(parts) > 1 else parts[0]

    def _encode(self, source: TextSource, role: str) -> datasets.Dataset:
        pairs = load_source(source, role, self.cache_dir)
        if source.messages_field is not None:
            if self.tokenizer.chat_template is None:
                raise ValueError(
                    f"TextDataModule {role}: {describe(source)}: messages_field={source.messages_field!r} needs a chat "
                    f"template, and tokenizer {self.tokenizer_path!r} has none; set tokenizer.chat_template and save it "
                    "(tokenizer_config.json), or use prompt/response fields"
                )
            encode = partial(
                encode_chats,
                tokenizer=self.tokenizer,
                max_length=self.max_length,
                include_assistant=source.include_assistant,
            )
        else:
            encode = partial(
                encode_pairs,
                tokenizer=self.tokenizer,
                max_length=self.max_length,
                add_bos=self.add_bos,
                append_eos=self.append_eos,
            )
        ds = pairs.map(encode, batched=True, remove_columns=pairs.column_names, desc=f"{role}: tokenize")
        ds = ds.filter(
            lambda labels: any(t != IGNORE_INDEX for t in labels),
            input_columns="labels",
            desc=f"{role}: drop rows without response",
        )
        if len(ds) == 0:
            raise ValueError(
                f"TextDataModule {role}: {describe(source)}: no row keeps a response token after truncation to "
                f"max_length={self.max_length} (empty responses or no assistant turn, or prompts longer than max_length)"
            )
        return ds

    def _hold_out(
        self, ds: datasets.Dataset, size: int | float, role: str, arg: str
    ) -> tuple[datasets.Dataset, datasets.Dataset]:
        """``(rest, held_out)``; both must be non-empty."""
        n_out = round(size * len(ds)) if isinstance(size, float) and size < 1 else int(size)
        if not 0 < n_out < len(ds):
            raise ValueError(
                f"TextDataModule {role}: {arg}={size} holds out {n_out} of {len(ds)} rows; "
                "both the held-out part and the rest must be non-empty"
            )
        parts = ds.train_test_split(test_size=n_out, shuffle=True, seed=self.seed)
        return parts["train"], parts["test"]

    # ------------------------------------------------------------------ loaders
    @property
    def val_dataloader_names(self) -> list[str]:
        """Names of :meth:`val_dataloader`'s loaders, in order (``task``, ``preserve``)."""
        self.setup()
        return [name for name, key in (("task", "task_val"), ("preserve", "preserve_val")) if key in self.splits]

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        keys = [k for k in ("task_val", "preserve_val") if k in self.splits]
        return [self._loader(self.splits[k], self.eval_batch_size) for k in keys]

    def preserve_val_dataloader(self) -> DataLoader | None:
        """The held-out rows of ``preserve`` (with labels; ``None`` without ``preserve_val_size``): FORA's leakage
        probe and its report's KL(base || tuned) and perplexity read it."""
        self.setup()
        return (
            self._loader(self.splits["preserve_val"], self.eval_batch_size) if "preserve_val" in self.splits else None
        )

    def calibration_dataloader(self) -> DataLoader:
        """Label-free batches (``input_ids``, ``attention_mask``) of the capability to keep."""
        self.setup()
        if "calibration" not in self.splits:
            raise ValueError(
                "TextDataModule: calibration_dataloader() needs preserve=TextSource(...) (the capability to keep)"
            )
        return self._loader(self.splits["calibration"], self.calibration_batch_size, labels=False)

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool = False, labels: bool = True) -> DataLoader:
        collate = PadCollator(self.tokenizer.pad_token_id, labels=labels, pad_to_multiple_of=self.pad_to_multiple_of)
        return DataLoader(
            ds.with_format(columns=["input_ids", "labels"] if labels else ["input_ids"]),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.num_workers,
        )


def _as_source(source: TextSource | dict | None) -> TextSource | None:
    """Accept a :class:`TextSource` or its dict form (as from a checkpoint or plain Python)."""
    return TextSource(**source) if isinstance(source, dict) else source
