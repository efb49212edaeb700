"""ForaModule: wrap any LightningModule so that fitting it runs FORA; nothing else changes."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.core.hooks import DataHooks, ModelHooks
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from fora_lightning._compat import hparams_name, reset_hparams, sync_trainer_state
from fora_lightning.callback import FORA
from fora_lightning.config import LORA_STRUCTURE, ForaConfig

# Every hook and step the Trainer may call; the wrapper exposes exactly those the wrapped module overrides.
_DELEGATED = tuple(n for cls in (ModelHooks, DataHooks) for n in vars(cls) if not n.startswith("_")) + (
    "training_step",
    "validation_step",
    "test_step",
    "predict_step",
    "configure_optimizers",
    "optimizer_step",
    "optimizer_zero_grad",
    "lr_scheduler_step",
    "configure_gradient_clipping",
    "backward",
)
_CALIBRATION = ("calibration_step", "calibration_dataloader", "generate_continuations")
CHECKPOINT_KEY = "fora_module"


class ForaModule(LightningModule):
    """Fit ``module`` with FORA: ``ForaModule(module, target_modules=[...], energy=0.95)`` is all a user writes.

    Training, validation, test and predict steps, ``configure_optimizers``, ``configure_model``, the data
    hooks and every other hook the wrapped module overrides (and ``calibration_step`` /
    ``calibration_dataloader`` / ``generate_continuations`` when it defines them) run on the wrapped module, as if it
    were fitted itself.
    ``configure_callbacks`` adds :class:`~fora_lightning.FORA` built from this wrapper's arguments (or
    :class:`~fora_lightning.ForaLoRA` when ``lora_rank`` is set); calibration batches come from the
    datamodule's ``calibration_dataloader()``, else the wrapped module's.

    Checkpoints hold the wrapped module's own state dict (no ``module.`` prefix) and hyper-parameters, so
    ``TheUserModule.load_from_checkpoint(path)`` works on them; the FORA settings and the wrapped class sit
    under ``checkpoint["fora_module"]`` for :meth:`load_from_checkpoint`. After a FORA-LoRA run the state dict
    holds the FORA-LoRA layers (``fc1.base_layer.weight``, ``fc1.lora_A``, ...), which the bare class cannot
    load: :meth:`load_from_checkpoint` rebuilds them, and ``merge_lora(ForaModule.load_from_checkpoint(path).module)``
    is the user's module with the update folded into its plain weights (save its ``state_dict()``, or for a
    Hugging Face model ``save_pretrained``). From LightningCLI (subclass mode),
    the wrapped module gets back its own ``hparams`` (its ``init_args`` over its signature's defaults),
    which LightningCLI overwrites with the outer config.

    ``config`` is a :class:`~fora_lightning.ForaConfig` (in YAML: ``config: {energy: 0.95, weight_rank: 0}``);
    keyword ``settings`` apply over it in Python (``ForaModule(m, energy=0.95)``). With ``extend_to`` the task just
    learned is measured on the datamodule's training data; ``lora_rank`` selects the parameter-efficient variant.
    """

    def __init__(self, module: LightningModule, config: ForaConfig | None = None, **settings: Any) -> None:
        super().__init__()
        if not isinstance(module, LightningModule):
            raise TypeError(f"ForaModule(module=...) needs a LightningModule, got {type(module).__name__}")
        _restore_own_hparams(module)
        self.module = module
        self.config = ForaConfig.resolve(config, settings)
        self.config.refuse_unused("ForaLoRA" if self.config.is_lora else "FORA")
        self.save_hyperparameters({"module": _describe(module), "config": self.config.to_dict()})
        for name in _DELEGATED:
            if is_overridden(name, module, LightningModule):
                self._delegate(name)
        for name in _CALIBRATION:
            if callable(getattr(module, name, None)):
                self._delegate(name)

    def _delegate(self, name: str) -> None:
        """Expose ``module.<name>`` as ``self.<name>``, keeping the wrapped module's Trainer-managed state in sync."""
        target: Callable[..., Any] = getattr(self.module, name)

        @functools.wraps(target)
        def delegated(*args: Any, **kwargs: Any) -> Any:
            sync_trainer_state(self.module, self)  # the hook being run (what self.log() checks), the device mesh
            return target(*args, **kwargs)

        object.__setattr__(self, name, delegated)

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def automatic_optimization(self) -> bool:
        return self.module.automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.module.automatic_optimization = value

    # ------------------------------------------------------------------ the callback
    @override
    def configure_callbacks(self) -> list[Callback]:
        """The wrapped module's own callbacks, then ``FORA(config=...)`` (``ForaLoRA`` when ``lora_rank`` is set)."""
        own = self.module.configure_callbacks()
        own = [own] if isinstance(own, Callback) else list(own or [])
        if not self.config.is_lora:
            fora: Callback = FORA(config=self.config)
        else:
            from fora_lightning.lora import ForaLoRA

            fora = ForaLoRA(config=self.config)
        return [*own, fora]

    # ------------------------------------------------------------------ checkpoints: the wrapped module's own
    @override
    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The wrapped module's state dict, keys without a ``module.`` prefix."""
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the wrapped module's hparams as the checkpoint's, and this wrapper's settings under ``fora_module``."""
        self.module.on_save_checkpoint(checkpoint)
        for key in (
            self.CHECKPOINT_HYPER_PARAMS_KEY,
            self.CHECKPOINT_HYPER_PARAMS_NAME,
            self.CHECKPOINT_HYPER_PARAMS_TYPE,
        ):
            checkpoint.pop(key, None)
        if self.module.hparams:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = dict(self.module.hparams)
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_NAME] = hparams_name(self.module)
        checkpoint[CHECKPOINT_KEY] = {"class_path": _class_path(type(self.module)), "config": self.config.to_dict()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.module.on_load_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        strict: bool | None = None,
        module_class: type[LightningModule] | None = None,
        **overrides: Any,
    ) -> ForaModule:
        """Rebuild the wrapper: ``module_class.load_from_checkpoint(path)`` wrapped with the saved FORA settings.

        ``module_class`` defaults to the class recorded in the checkpoint, which must already be imported
        (as Lightning requires for classes named by checkpoints). ``overrides`` replace saved FORA settings.
        A FORA-LoRA checkpoint (``lora_rank`` set) gets its layers injected with the saved settings before its
        state dict is loaded; overrides may not change those (``target_modules``, ``lora_rank``, ``lora_alpha``,
        ``weight_rank``).
        """
        checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError(f"{checkpoint_path}: no '{CHECKPOINT_KEY}' entry; it was not written by a ForaModule fit")
        module_class = module_class or _imported_class(meta["class_path"], checkpoint_path)
        saved = ForaConfig.from_dict(meta.get("config", meta))  # checkpoints before ForaConfig kept the settings flat
        config = ForaConfig.resolve(saved, overrides)
        if not saved.is_lora:
            inner = module_class.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict)
        else:
            _check_lora_overrides(saved, config, checkpoint_path)
            inner = _load_lora_module(
                module_class, checkpoint_path, checkpoint["state_dict"], config, map_location, strict
            )
        return cls(inner, config)


def _check_lora_overrides(saved: ForaConfig, config: ForaConfig, checkpoint_path: str | Path) -> None:
    """Refuse overrides that would rebuild a FORA-LoRA checkpoint's layers differently from how they were trained."""
    changed = {k: getattr(config, k) for k in LORA_STRUCTURE if getattr(config, k) != getattr(saved, k)}
    if changed:
        kept = {k: getattr(saved, k) for k in changed}
        raise ValueError(
            f"{checkpoint_path}: a FORA-LoRA checkpoint is rebuilt with its saved layer settings {kept}, not {changed}; "
            "to train it differently, merge_lora(ForaModule.load_from_checkpoint(path).module) and wrap the merged module"
        )


def _load_lora_module(
    module_class: type[LightningModule],
    checkpoint_path: str | Path,
    state_dict: Mapping[str, Any],
    config: ForaConfig,
    map_location: Any,
    strict: bool | None,
) -> LightningModule:
    """The wrapped module of a FORA-LoRA checkpoint: built by Lightning from the saved hparams (its own state
    dict loaded loosely), FORA-LoRA layers injected, then ``state_dict`` loaded (as strictly as Lightning would)."""
    from fora_lightning.lora import inject_fora_lora, mark_only_lora_trainable

    with warnings.catch_warnings():
        # the missing base weights / unexpected LoRA keys, all loaded below once the layers exist
        warnings.filterwarnings("ignore", message="Found keys that are (not )?in the model state dict")
        inner = module_class.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=False)
    inject_fora_lora(inner, **config.lora_layer_kwargs())
    mark_only_lora_trainable(inner, config.freeze_other)  # requires_grad as trained: what export_lora_adapter writes
    inner.load_state_dict(state_dict, strict=inner.strict_loading if strict is None else strict)
    return inner


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(module: LightningModule) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": hparams}``: how the wrapped module appears in this wrapper's hparams."""
    return {"class_path": _class_path(type(module)), "init_args": dict(module.hparams)}


def _restore_own_hparams(module: LightningModule) -> None:
    """Undo LightningCLI's subclass-mode overwrite of a nested module's ``hparams``.

    LightningCLI instantiates the whole model config inside one hparams context, so a nested module's
    ``save_hyperparameters()`` stores the outer config (``_class_path``: the wrapper, ``module``: its own
    ``{class_path, init_args}``). Its own hparams are its ``init_args`` over its signature's defaults.
    """
    hp = module.hparams
    nested = hp.get("module") if isinstance(hp.get("module"), Mapping) else None
    if "_class_path" not in hp or hp["_class_path"] == _class_path(type(module)) or nested is None:
        return
    defaults = {
        name: p.default
        for name, p in inspect.signature(type(module).__init__).parameters.items()
        if name != "self"
        and p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    own = {**defaults, **dict(nested.get("init_args") or {})}
    reset_hparams(module, own)


def _imported_class(class_path: str, checkpoint_path: str | Path) -> type[LightningModule]:
    module_name, _, name = class_path.rpartition(".")
    if module_name not in sys.modules and not module_name.startswith("fora_lightning."):  # ours: imported lazily
        raise ValueError(
            f"{checkpoint_path}: the wrapped class {class_path!r} is not imported; import {module_name!r} first "
            "or pass module_class= (a checkpoint may not import code by itself)"
        )
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, LightningModule)):
        raise TypeError(f"{checkpoint_path}: {class_path!r} is not a LightningModule class")
    return obj
