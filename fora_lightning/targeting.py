"""Find the target linears of a fit and freeze the rest, before the strategy wraps the model.

Shared by :class:`~fora_lightning.FORA`, :class:`~fora_lightning.ForaLoRA` and the baseline Callbacks, so every
method of a comparison trains exactly the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from fora_lightning.core.targets import TargetModules, find_targets, name_matches, resolve_target_modules
from fora_lightning.safety import refuse_shared_weights


def when_targets_exist(pl_module: LightningModule, target_modules: TargetModules, select: Callable[[], None]) -> None:
    """Run ``select()`` now, or right after ``configure_model`` when the module builds its targets there.

    Lightning calls ``Callback.setup`` before ``LightningModule.configure_model`` and wraps the model
    (DDP, FSDP1) right after it, so layers created in ``configure_model`` can only be found and frozen
    in between: the module's ``configure_model`` is wrapped, for this fit, by one that runs ``select()``
    after it. A module that defines no ``configure_model`` gets ``select()`` now, and its error.
    """
    present = any(name and name_matches(name, target_modules) for name, _ in pl_module.named_modules())
    if present or not is_overridden("configure_model", pl_module):
        select()
        return
    configure_model = pl_module.configure_model

    def configure_model_then_select() -> None:
        configure_model()
        restore_configure_model(pl_module)
        select()

    pl_module.configure_model = configure_model_then_select  # Lightning looks the hook up on the instance


def restore_configure_model(pl_module: LightningModule) -> None:
    """Drop the instance-level ``configure_model`` set by :func:`when_targets_exist` (a fit that never got there)."""
    pl_module.__dict__.pop("configure_model", None)


def select_targets(
    pl_module: LightningModule,
    target_modules: TargetModules,
    freeze_other: bool,
    who: str,
    keep: Iterable[nn.Module] = (),
) -> dict[str, nn.Module]:
    """:func:`~fora_lightning.core.targets.find_targets` (refusing tied target weights), then (``freeze_other``)
    :func:`freeze_non_targets`; ``keep``: another callback's targets, left trainable."""
    resolved = resolve_target_modules(pl_module, target_modules)
    if resolved != target_modules:
        rank_zero_info(
            f"{who}: the default target_modules match nothing; this is a GPT-2-family model, targeting {resolved}"
        )
    targets = find_targets(pl_module, resolved)
    refuse_shared_weights(pl_module, targets, who)
    if freeze_other:
        freeze_non_targets(pl_module, targets, who, keep)
    return targets


def freeze_non_targets(
    pl_module: LightningModule, targets: Mapping[str, nn.Module], who: str, keep: Iterable[nn.Module] = ()
) -> None:
    """``requires_grad=False`` on every parameter that is not a target weight (nor a ``keep`` weight), with counts in the log."""
    kept_ids = {id(m.weight) for m in keep}
    target_ids = {id(m.weight) for m in targets.values()}
    frozen = kept = frozen_numel = kept_numel = 0
    for p in pl_module.parameters():
        if id(p) in target_ids:
            kept += 1
            kept_numel += p.numel()
            if not p.requires_grad:
                rank_zero_warn(f"{who}: a target weight has requires_grad=False; it will not train")
        elif p.requires_grad and id(p) not in kept_ids:
            p.requires_grad_(False)
            frozen += 1
            frozen_numel += p.numel()
    rank_zero_info(
        f"{who}: training {kept} target weights ({kept_numel:,} parameters); froze {frozen} other parameter tensors "
        f"({frozen_numel:,} parameters: biases, norms, embeddings, ...). Set freeze_other=False to train them unprotected."
    )
