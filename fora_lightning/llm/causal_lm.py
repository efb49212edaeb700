"""CausalLMModule: fine-tune any ``AutoModelForCausalLM`` with response-only loss."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from fora_lightning._compat import no_split_module_names
from fora_lightning.llm.encoding import IGNORE_INDEX
from fora_lightning.llm.gather import full_state_dict, unsharded_copy
from fora_lightning.lora import export_lora_adapter, fora_lora_layers, merge_lora

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(LightningModule):
    r"""A Hugging Face causal LM as a LightningModule.

    * Loss: mean next-token cross-entropy over positions whose label is not ``-100`` (the response tokens;
      :class:`~fora_lightning.TextDataModule` masks prompt and padding).
    * Optimizer: AdamW (weight decay on weights with >= 2 dims only) over trainable parameters, learning rate
      ``lr (t + 1) / w`` for ``t < w = warmup_ratio * T`` warm-up steps, then
      ``lr * (m + (1 - m) (1 + cos(pi (t - w) / (T - w))) / 2)`` with ``m = min_lr_ratio`` and
      ``T = trainer.estimated_stepping_batches``.
    * Validation/test: per dataloader, ``{stage}/{name}_loss`` (token-weighted mean NLL over the epoch) and
      ``{stage}/{name}_ppl = exp(loss)``; ``name`` from the datamodule's ``val_dataloader_names``, else ``dl{i}``,
      and no prefix for a single unnamed loader (``val/loss``, ``val/ppl``).
    * ``calibration_step``: a forward with ``input_ids`` and ``attention_mask`` (what FORA calibrates on);
      ``generate_continuations``: a calibration batch extended by the model's own greedy continuations.
    * ``save_dir``: at the end of fit, ``save_pretrained`` of the tuned model (and tokenizer) there. A model holding
      FORA-LoRA layers is saved merged (plain weights ``W0 + update``), its adapter (PEFT layout) in ``save_dir/adapter``;
      under FSDP2 the shards are gathered to rank 0 first (FSDP1 with FORA-LoRA and ``save_dir`` is refused).

    The model is built in ``__init__`` (so FORA's ``setup`` finds and freezes its linear layers before any
    strategy wraps it); ``configure_model`` applies FSDP2 ``fully_shard`` per decoder block then the root when
    the trainer runs ``ModelParallelStrategy``; FSDP1 (``FSDPStrategy``) wraps it by its ``auto_wrap_policy``.

    Args:
        model: hub name or local directory for ``from_pretrained``; or None with ``config``.
        config: an inline config for ``AutoConfig.for_model`` (must hold ``model_type``), randomly initialised.
        tokenizer: hub name or directory of the tokenizer; defaults to ``model``. Saved with the model.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights. attn_implementation: e.g. ``sdpa``, ``eager``.
        gradient_checkpointing: trade compute for activation memory.
        num_threads: CPU intra-op threads (``torch.set_num_threads``) from ``setup`` on; ``None`` keeps torch's
            default. For tiny models on a shared CPU, 1 is often several times faster than 2.
    """

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        save_dir: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError(
                "CausalLMModule: give exactly one of model (hub name or local path) and config (inline dict)"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"CausalLMModule: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.save_hyperparameters()
        # from_pretrained leaves the model in eval mode and Lightning keeps each module's mode: train dropout etc.
        self.model: PreTrainedModel = _build_model(model, config, _DTYPES[dtype], attn_implementation).train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        tokenizer = tokenizer or model
        self.tokenizer: PreTrainedTokenizerBase | None = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
        self._eval_sums: dict[int, torch.Tensor] = {}
        self._sharded = False

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, count = self._nll(batch)
        loss = nll / count.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._accumulate(batch, dataloader_idx)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._accumulate(batch, dataloader_idx)

    def calibration_step(self, batch: dict[str, torch.Tensor]) -> Any:
        """The forward FORA runs on label-free calibration batches."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def generate_continuations(
        self, batch: dict[str, torch.Tensor], max_new_tokens: int, samples: int = 0
    ) -> dict[str, torch.Tensor]:
        """``batch`` with each row followed by the model's own greedy continuation (label-free; what FORA's
        ``calibration_generate`` calibrates on): :func:`~fora_lightning.llm.generation.greedy_extend` through
        ``self.model.generate``, ``synced_gpus`` when several processes run. ``samples > 0``: each row ``samples``
        times with sampled continuations instead (``calibration_samples``)."""
        from fora_lightning.llm.generation import greedy_extend

        config = self.model.generation_config
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else config.pad_token_id
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        if pad is None:
            pad = eos if eos is not None else 0
        synced = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        ids, mask = greedy_extend(
            self.model, batch["input_ids"], batch.get("attention_mask"), max_new_tokens, pad, eos, synced, samples
        )
        return {"input_ids": ids, "attention_mask": mask}

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of next-token NLL over labelled positions, and their count."""
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, (labels != IGNORE_INDEX).sum()

    # ------------------------------------------------------------------ per-dataloader perplexity
    @override
    def on_validation_epoch_start(self) -> None:
        self._eval_sums = {}

    @override
    def on_test_epoch_start(self) -> None:
        self._eval_sums = {}

    def _accumulate(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> None:
        nll, count = self._nll(batch)
        acc = self._eval_sums.setdefault(dataloader_idx, torch.zeros(2, dtype=torch.float64, device=nll.device))
        acc += torch.stack([nll.detach().double(), count.double()])

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, stage: str) -> None:
        """``loss = sum NLL / sum tokens`` over all ranks and batches; ``ppl = exp(loss)``."""
        names = getattr(self.trainer.datamodule, f"{stage}_dataloader_names", None)
        for idx in sorted(self._eval_sums):
            total = self.trainer.strategy.reduce(self._eval_sums[idx], reduce_op="sum")
            loss = (total[0] / total[1].clamp(min=1)).float()
            if names is not None and idx < len(names):
                prefix = f"{stage}/{names[idx]}_"
            else:
                prefix = f"{stage}/" if len(self._eval_sums) == 1 else f"{stage}/dl{idx}_"
            self.log(prefix + "loss", loss, sync_dist=False)
            self.log(prefix + "ppl", loss.exp(), prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = warmup_cosine(total, round(hp.warmup_ratio * total), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def setup(self, stage: str) -> None:
        if self.hparams.num_threads is not None:
            torch.set_num_threads(self.hparams.num_threads)

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 ``fully_shard`` each decoder block, then the whole model (once)."""
        if self.device_mesh is None or self._sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        block_names = no_split_module_names(self.model)
        for module in self.model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True

    # ------------------------------------------------------------------ export
    @override
    def on_fit_start(self) -> None:
        """Refuse, before training, a ``save_dir`` export of FORA-LoRA layers under FSDP1 (``FSDPStrategy``): only
        FSDP2 (``ModelParallelStrategy``) models are gathered into an unsharded copy for the merge and the adapter."""
        if self.hparams.save_dir and isinstance(self.trainer.strategy, FSDPStrategy) and fora_lora_layers(self.model):
            raise NotImplementedError(
                "CausalLMModule(save_dir=...) with FORA-LoRA layers under FSDPStrategy (FSDP1): the merged export is "
                "gathered for ModelParallelStrategy (FSDP2) only; use ModelParallelStrategy, or train without save_dir "
                "and merge_lora / export_lora_adapter a model loaded from a full checkpoint"
            )

    @override
    def on_fit_end(self) -> None:
        if self.hparams.save_dir:
            self.save_pretrained(self.hparams.save_dir)

    def save_pretrained(self, directory: str | Path) -> None:
        """``save_pretrained`` of the model (full weights gathered from shards) and tokenizer, on global rank 0.

        FORA-LoRA layers are merged into a copy of the model (a plain Hugging Face model, saved there) and also
        exported with :func:`~fora_lightning.export_lora_adapter` to ``directory/adapter``; the model keeps its layers.
        Under ``ModelParallelStrategy`` (FSDP2) every rank calls this (the gather is a collective): the full state dict
        goes to rank 0's CPU (:func:`~fora_lightning.llm.gather.full_state_dict`), which writes it.
        """
        directory = Path(directory)
        lora = bool(fora_lora_layers(self.model))
        strategy = self.trainer.strategy
        state: dict[str, Any] | None = None
        if isinstance(strategy, ModelParallelStrategy):
            state = full_state_dict(self.model)
        elif isinstance(strategy, FSDPStrategy):
            state = {k.removeprefix("model."): v for k, v in strategy.lightning_module_state_dict().items()}
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        if not self.trainer.is_global_zero:
            return
        if lora:
            tuned = copy.deepcopy(self.model) if state is None else unsharded_copy(self.model, state)
            adapter = export_lora_adapter(tuned, directory / "adapter")
            merge_lora(tuned).save_pretrained(directory)
            saved = f"the tuned model (FORA-LoRA merged) to {directory} and its adapter (PEFT layout) to {adapter}"
        else:
            self.model.save_pretrained(directory, state_dict=state)
            saved = f"the tuned model to {directory}"
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
            saved += ", the tokenizer alongside"
        rank_zero_info(f"CausalLMModule: saved {saved}")


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: ``(t + 1) / w`` for ``t < w``, then cosine from 1 down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _build_model(
    model: str | None, config: dict[str, Any] | None, dtype: torch.dtype, attn: str | None
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"CausalLMModule: config needs a 'model_type' (e.g. 'llama', 'qwen3'); got keys {sorted(config)}"
        )
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), **kwargs)
