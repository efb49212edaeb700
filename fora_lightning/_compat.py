"""Every private Lightning / torch / transformers API fora-lightning touches, each behind one small function.

An upgrade that renames one of these breaks it here, and only here. Each function says the version it was
checked against and the public API that would replace it. Lightning and torch's FSDP1 are imported inside the
functions, so importing this module costs nothing; ``fora_lightning.core`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


# ------------------------------------------------------------------------------------------------ Lightning
def forward_redirection(
    wrapper: nn.Module, module: LightningModule, method_name: str, *args: Any, **kwargs: Any
) -> Any:
    """``module.<method_name>(*args, **kwargs)`` routed through ``wrapper.forward`` (DDP, FSDP1), as Lightning routes
    ``training_step``: the wrapper's forward hooks (all-gather, buffer sync) run around the call."""
    # Checked: lightning 2.6.6, lightning.pytorch.strategies.strategy._ForwardRedirection (since 2.1).
    # Public replacement: none; Strategy.training_step/validation_step do this for the standard steps only.
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    return _ForwardRedirection()(wrapper, module, method_name, *args, **kwargs)


def sync_trainer_state(inner: LightningModule, outer: LightningModule) -> None:
    """Copy onto a wrapped ``inner`` module the Trainer-managed state of the ``outer`` one that the Trainer drives:
    the hook being run (what ``self.log()`` checks) and the device mesh (set by ModelParallelStrategy)."""
    # Checked: lightning 2.6.6, LightningModule._current_fx_name and LightningModule._device_mesh (set by
    # the Trainer's hook calls and by ModelParallelStrategy._setup_model). Public: LightningModule.device_mesh is
    # read-only; there is no public setter for either, nor a public "current hook" property.
    inner._current_fx_name = outer._current_fx_name
    inner._device_mesh = outer.device_mesh


def reset_hparams(module: LightningModule, hparams: Mapping[str, Any]) -> None:
    """Replace ``module.hparams`` and ``module.hparams_initial`` by ``hparams`` (old keys dropped, container type kept)."""
    # Checked: lightning 2.6.6, HyperparametersMixin._hparams, _set_hparams, _hparams_initial.
    # Public: save_hyperparameters(dict) merges into the existing hparams and cannot drop keys, hence the privates.
    hp = module.hparams
    module._hparams = type(hp)()
    module._set_hparams(dict(hparams))
    module._hparams_initial = type(hp)(hparams)


def hparams_name(module: LightningModule) -> str | None:
    """The name under which ``module``'s init arguments were saved, for a checkpoint's ``hparams_name`` entry:
    ``"kwargs"``, one argument's name (an ``hparams`` dict or Namespace passed in), ``None`` for no hparams."""
    # Checked: lightning 2.6.6, HyperparametersMixin._hparams_name (set by utilities.parsing.save_hyperparameters,
    # read by the checkpoint connector). Public replacement: none.
    return getattr(module, "_hparams_name", "kwargs")


# ------------------------------------------------------------------------------------------------ FSDP1 (torch)
# Checked: torch 2.13, torch.distributed.fsdp.FullyShardedDataParallel._handle (a FlatParamHandle of
# torch.distributed.fsdp._flat_param) and its FlatParameter's private metadata. Public replacement: FSDP2
# (torch.distributed.fsdp.fully_shard), whose parameters are DTensors (DTensor.to_local(), no flat buffers);
# FSDP1 is deprecated in its favour.
def fsdp1_handles(root: nn.Module) -> list[Any]:
    """The flat-parameter handle of every FSDP1 unit in ``root`` (units without parameters skipped), in model order."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [h for unit in FSDP.fsdp_modules(root) if (h := getattr(unit, "_handle", None)) is not None]


def flat_param_members(handle: Any) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of each original parameter in the handle's flat parameter, in flat order."""
    return [(info.module, info.param_name) for info in handle.flat_param._param_infos]


def flat_param_local(handle: Any) -> Tensor:
    """This rank's 1-D shard of the flat parameter's data (its storage: edits persist), the whole buffer unsharded."""
    flat = handle.flat_param
    return getattr(flat, "_local_shard", flat.data) if handle.uses_sharded_strategy else flat.data


def flat_param_sizes(handle: Any) -> tuple[int, int]:
    """``(padded, unpadded)`` element counts of the whole (unsharded) flat parameter."""
    flat = handle.flat_param
    return flat._padded_unsharded_size.numel(), flat._unpadded_unsharded_size.numel()


def flat_param_views(handle: Any, flat: Tensor) -> list[Tensor]:
    """Views of an unpadded, unsharded flat buffer as each original parameter's shape (e.g. a 2-D weight)."""
    return list(handle._get_unflat_views(flat))


# ------------------------------------------------------------------------------------------------ forward hooks (torch)
# transformers' output-capturing hooks record outputs only while its decorator's context (reset in a finally) is active
HARMLESS_HOOK_MODULES = ("transformers.utils.output_capturing",)


def foreign_forward_hooks(model: nn.Module) -> list[str]:
    """Where forward (pre-)hooks other than transformers' output capturing sit: ``"global"`` or module names; a
    module wrapped by accelerate's hooks (``_hf_hook``: device placement / offload around its forward) counts."""
    # Checked: torch 2.13, nn.Module._forward_hooks / _forward_pre_hooks (dicts id -> hook) and
    # torch.nn.modules.module._global_forward_hooks / _global_forward_pre_hooks; accelerate 1.x hooks.add_hook_to_module
    # sets module._hf_hook. Public replacement: none (register_* return handles, nothing lists the hooks).
    from torch.nn.modules import module as torch_module

    def foreign(hooks: Mapping[int, Any]) -> bool:
        return any(getattr(h, "__module__", None) not in HARMLESS_HOOK_MODULES for h in hooks.values())

    out = (
        ["global"]
        if foreign(torch_module._global_forward_hooks) or foreign(torch_module._global_forward_pre_hooks)
        else []
    )
    for name, m in model.named_modules():
        if foreign(m._forward_hooks) or foreign(m._forward_pre_hooks) or hasattr(m, "_hf_hook"):
            out.append(name or type(m).__name__)
    return out


# ------------------------------------------------------------------------------------------------ transformers
def no_split_module_names(model: nn.Module) -> set[str]:
    """Class names of the blocks a Hugging Face model says must not be split across devices (its decoder layers)."""
    # Checked: transformers 5.24, PreTrainedModel._no_split_modules (read the same way by accelerate's
    # device_map="auto"). Public replacement: none.
    return set(getattr(model, "_no_split_modules", None) or [])
