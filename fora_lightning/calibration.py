"""Calibration: run the kept capability's label-free batches through the model and collect input covariances.

Each rank runs its share of the batches (:class:`~fora_lightning.core.distributed.RankShare`) through the
strategy's wrapped model under the precision plugin's forward context, as training would; the sums and token
counts are then all-reduced, so every rank holds ``C = (1/N) sum_t x_t x_t^T`` over all batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
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
    panel: int = 0,
    product: Product = "accumulator",
    early_stop: bool = True,
) -> Covariances:
    """Covariances of every target's input over this rank's share of ``loader``, summed over ranks.

    ``generate > 0``: each batch is first extended by the model's own greedy continuation of up to that many
    tokens (:func:`_with_continuations`), so the covariances see what the capability reads while it answers.
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
    if generate > 0:
        batches = _with_continuations(trainer, pl_module, share, generate)
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
    )
    if share.empty:  # fewer batches than ranks: this rank ran one only to learn the shapes
        for o in covariances.sums:
            covariances.sums[o].zero_()
            covariances.counts[o] = 0
    if share.padding:  # FSDP/DDP forwards are collectives: every rank runs ceil(n / world_size) of them
        with eval_mode(trainer.strategy.model), torch.no_grad():
            for _ in range(share.padding):
                step(share.filler())
    if share.sharded:
        covariances.all_reduce_()
    return covariances


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
    trainer: Trainer, pl_module: LightningModule, share: RankShare, max_new_tokens: int
) -> list[Any]:
    """This rank's batches, each extended by ``pl_module.generate_continuations(batch, max_new_tokens)`` before any
    covariance is collected (the generation's own forwards are not counted).

    The call goes through the strategy's wrapped model (as ``calibration_step``), and a rank with fewer batches
    generates ``share.padding`` more times (discarded): under FSDP generation is a collective.
    """
    hook = getattr(pl_module, "generate_continuations", None)
    if not callable(hook):
        raise ValueError(
            f"calibration_generate={max_new_tokens} needs {type(pl_module).__name__}.generate_continuations(batch, max_new_tokens) "
            "returning the batch extended by the model's own continuations (CausalLMModule has it); or set calibration_generate=0"
        )
    wrapper = trainer.strategy.model

    def extend(batch: Any) -> Any:
        batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
        with trainer.precision_plugin.forward_context(), torch.no_grad():
            if wrapper is None or wrapper is pl_module:
                return hook(batch, max_new_tokens)
            return forward_redirection(wrapper, pl_module, "generate_continuations", batch, max_new_tokens)

    with eval_mode(wrapper if wrapper is not None else pl_module):
        extended = [extend(b) for b in share]
        for _ in range(share.padding):
            extend(share.filler())
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
