"""Calibration: run the kept capability's label-free batches through the model and collect input covariances.

Each rank runs its share of the batches (:class:`~fora_lightning.core.distributed.RankShare`) through the
strategy's wrapped model under the precision plugin's forward context, as training would; the sums and token
counts are then all-reduced, so every rank holds ``C = (1/N) sum_t x_t x_t^T`` over all batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch import nn

from fora_lightning._compat import foreign_forward_hooks, forward_redirection
from fora_lightning.core.covariance import Covariances, collect_covariances, eval_mode
from fora_lightning.core.distributed import RankShare
from fora_lightning.core.gram import Product
from fora_lightning.trainer_progress import calibration_progress

CalibrationSource = Iterable[Any] | Mapping[str, Iterable[Any]] | Callable[[], Iterable[Any]] | None
COVARIANCE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def holdout_batch(index: int, every: int) -> bool:
    """The calibration hold-out slice, per capability: batch ``index`` (0-based, in the loader's order) is held out
    when ``index % every == 0`` (every=8: the 1st, 9th, 17th, ...), so one batch at least whenever there is one.
    ``every = 0``: none. A loader of one batch is all hold-out: nothing is left to estimate a basis from, so the
    sufficiency estimate is skipped (the final bases still use that batch)."""
    return every > 0 and index % every == 0


def materialize(source: CalibrationSource) -> Any:
    """``source()`` when it is a factory (callable and not itself iterable), else ``source`` as given."""
    return source() if callable(source) and not hasattr(source, "__iter__") else source


def resolve_calibration(calibration: CalibrationSource, trainer: Trainer, pl_module: LightningModule) -> Any:
    """``calibration`` (called if it is a factory), else ``trainer.datamodule.calibration_dataloader()``,
    else ``pl_module.calibration_dataloader()``; either may be a loader or a mapping ``name -> loader``."""
    if calibration is not None:
        return materialize(calibration)
    for owner in (trainer.datamodule, pl_module):
        fn = getattr(owner, "calibration_dataloader", None)
        if callable(fn):
            return fn()
    raise ValueError(
        "FORA found no calibration data. It looked at FORA(calibration=...) (None), "
        f"trainer.datamodule.calibration_dataloader() ({'no datamodule' if trainer.datamodule is None else 'not defined'}) "
        f"and {type(pl_module).__name__}.calibration_dataloader() (not defined). Pass a DataLoader of the capability to keep"
    )


def calibrate(
    trainer: Trainer,
    pl_module: LightningModule,
    targets: Mapping[str, nn.Linear],
    loader: Iterable[Any],
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    generate: int = 0,
    samples: int = 0,
    sample_tokens: int = 32,
    originals: bool = True,
    panel: int = 0,
    product: Product = "accumulator",
    early_stop: bool = True,
    holdout_every: int = 0,
    holdout: list[Any] | None = None,
) -> Covariances:
    """Covariances of every target's input over this rank's share of ``loader``, summed over ranks.

    ``generate > 0``: each batch is first extended by the model's own greedy continuation of up to that many
    tokens (:func:`_with_continuations`), so the covariances see what the capability reads while it answers;
    ``samples > 0``: each batch is followed by ``samples`` sampled continuations (``sample_tokens`` long) of each
    of its rows (a batch and its samples are held out together); ``originals=False``: the samples only.
    ``holdout_every``: the batches :func:`holdout_batch` picks (by their index in the whole loader) are summed apart
    into the result's ``held_out`` (:meth:`~fora_lightning.core.covariance.Covariances.merge_held_out_` adds them
    back); ``holdout``: a list this rank's held-out batches are appended to (on the CPU, as calibrated).
    ``panel``, ``product``: the cheaper products of
    :class:`~fora_lightning.core.covariance.CovarianceCollector`. ``early_stop``: end each forward after the
    last target's input where :func:`early_stop_safe` allows it (the same sums: nothing after it is summed).
    """
    forward = calibration_forward(pl_module, trainer.strategy.model)
    stop_early = early_stop and early_stop_safe(trainer.strategy, trainer.strategy.model or pl_module)

    def step(batch: Any) -> None:
        with trainer.precision_plugin.forward_context():
            forward(
                trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
            )  # bf16-true: cast inputs

    share = RankShare(loader, trainer.global_rank, trainer.world_size)
    batches: Iterable[Any] = share
    if generate > 0 or samples > 0:
        batches = _with_continuations(trainer, pl_module, share, generate, samples, sample_tokens, originals)
    per = 2 if samples > 0 and originals else 1  # a batch, then its samples

    def held_out(j: int) -> bool:  # this rank's j-th batch is the loader's (rank + j world_size)-th when sharded
        index = trainer.global_rank + j // per * trainer.world_size if share.sharded else j // per
        return not share.empty and holdout_batch(index, holdout_every)

    if holdout is not None and holdout_every > 0:
        batches = _keeping(batches, held_out, holdout)
    covariances = collect_covariances(
        pl_module,
        targets,
        batches,
        step,
        dtype=dtype,
        progress=calibration_progress(trainer, progress),
        panel=panel,
        product=product,
        stop_early=stop_early,
        held_out=held_out if holdout_every > 0 else None,
    )
    if share.empty:  # fewer batches than ranks: this rank ran one only to learn the shapes
        for cov in (covariances, covariances.held_out):
            for o in cov.sums if cov is not None else ():
                cov.sums[o].zero_()
                cov.counts[o] = 0
    if share.padding:  # FSDP/DDP forwards are collectives: every rank runs ceil(n / world_size) of them
        with eval_mode(trainer.strategy.model), torch.no_grad():
            for _ in range(share.padding):
                step(share.filler())
    if share.sharded:
        covariances.all_reduce_()
    return covariances


def _keeping(batches: Iterable[Any], held_out: Callable[[int], bool], into: list[Any]) -> Iterable[Any]:
    """``batches`` unchanged; each held-out one is also appended to ``into`` (moved to the CPU)."""
    for j, batch in enumerate(batches):
        if held_out(j):
            into.append(move_data_to_device(batch, "cpu"))
        yield batch


def early_stop_safe(strategy: Strategy, model: nn.Module) -> bool:
    """Whether a calibration forward may be ended by an exception after the last target (core/early_stop.py).

    Yes on one device and under plain DDP: the forward runs under ``no_grad`` in eval mode; DDP's one collective
    in it (the buffer broadcast) runs *before* the module's forward, and what its post-forward does under
    ``no_grad`` (reset ``require_forward_param_sync``) the reference batch, run whole, already did; so an early
    exit leaves nothing half-done and ranks stopping at different points stay in step. No for every other
    strategy: FSDP1 and FSDP2 (FSDPStrategy, ModelParallelStrategy) unshard and reshard in hooks around each unit's
    forward and an exception skips the reshard and their post-forward state; DeepSpeed (ZeRO-3 gathers in hooks),
    XLA (lazy graphs) and other subclasses are not read. No when the model carries forward hooks we cannot reason
    about (anyone's but transformers' output capturing, accelerate's offload): the skipped part would skip them.
    The generation pass of ``calibration_generate`` needs the logits and never stops early.
    """
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        return False
    if getattr(model, "buffer_hook", None) is not None:  # DDP buffer comm hook: may sync after the forward
        return False
    return not foreign_forward_hooks(model)


def _with_continuations(
    trainer: Trainer,
    pl_module: LightningModule,
    share: RankShare,
    max_new_tokens: int,
    samples: int = 0,
    sample_tokens: int = 0,
    originals: bool = True,
) -> list[Any]:
    """This rank's batches, each extended by ``pl_module.generate_continuations(batch, max_new_tokens)`` (greedy;
    ``max_new_tokens = 0``: as given) before any covariance is collected (the generation's own forwards are not
    counted). ``samples > 0``: each is followed by ``generate_continuations(batch, sample_tokens, samples)``, its
    rows repeated ``samples`` times with sampled continuations, drawn under a forked RNG seeded by the batch's
    index (reproducible; the training RNG is untouched); ``originals=False``: the samples only.

    The call goes through the strategy's wrapped model (as ``calibration_step``), and a rank with fewer batches
    generates ``share.padding`` more times (discarded): under FSDP generation is a collective.
    """
    hook = getattr(pl_module, "generate_continuations", None)
    if not callable(hook):
        setting = f"calibration_generate={max_new_tokens}" if max_new_tokens else f"calibration_samples={samples}"
        raise ValueError(
            f"{setting} needs {type(pl_module).__name__}.generate_continuations(batch, max_new_tokens, samples=0) "
            "returning the batch extended by the model's own continuations (CausalLMModule has it); or set "
            "calibration_generate=0 and calibration_samples=0"
        )
    wrapper = trainer.strategy.model

    def extend(batch: Any, seed: int, *args: int) -> Any:
        batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
        devices = [batch["input_ids"].device] if isinstance(batch, Mapping) and batch["input_ids"].is_cuda else []
        with trainer.precision_plugin.forward_context(), torch.no_grad(), torch.random.fork_rng(devices):
            torch.manual_seed(seed)
            if wrapper is None or wrapper is pl_module:
                return hook(batch, *args)
            return forward_redirection(wrapper, pl_module, "generate_continuations", batch, *args)

    def run(batch: Any, j: int) -> list[Any]:
        out = [extend(batch, j, max_new_tokens) if max_new_tokens > 0 else batch] if originals else []
        return out + [extend(batch, j, sample_tokens, samples)] if samples > 0 else out

    with eval_mode(wrapper if wrapper is not None else pl_module):
        extended = [b for j, batch in enumerate(share) for b in run(batch, j)]
        for _ in range(share.padding):
            run(share.filler(), 0)
    return extended


def calibration_forward(pl_module: LightningModule, wrapper: nn.Module | None = None) -> Callable[[Any], Any]:
    """``calibration_step(batch)`` if the module defines it, else ``module(**batch)`` / ``(*batch)`` / ``(batch)``.

    With a strategy ``wrapper`` (DDP, FSDP1) the call goes through the wrapper's ``forward``, as Lightning
    routes ``training_step``: a bare FSDP1 module only holds shards.
    """
    call: nn.Module = wrapper if wrapper is not None else pl_module
    step = getattr(pl_module, "calibration_step", None)
    if callable(step):
        if call is pl_module:
            return step
        return lambda batch: forward_redirection(call, pl_module, "calibration_step", batch)

    def forward(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return call(**batch)
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, torch.Tensor)):
            return call(*batch)
        return call(batch)

    def explained(batch: Any) -> Any:
        try:
            return forward(batch)
        except TypeError as e:
            kind = "a mapping" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
            if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, torch.Tensor)):
                kind += f" of {len(batch)}"
            raise TypeError(
                f"FORA calibration: {type(pl_module).__name__}'s forward rejected a calibration batch ({e}). Batches reach "
                f"the model as module(**batch) for a mapping, module(*batch) for a tuple/list, module(batch) otherwise; "
                f"this one is {kind}. A training loader of (x, y) passes y too: give a loader of inputs only, or define "
                f"calibration_step(self, batch) on the LightningModule"
            ) from e

    return explained
