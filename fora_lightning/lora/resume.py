"""Size FORA-LoRA basis buffers from a sharded (torch.distributed.checkpoint) checkpoint before it loads in place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fora_lightning.lora.layer import ForaLoraLinear

METADATA = ".metadata"  # torch.distributed.checkpoint's FileSystemWriter (as Lightning's _is_sharded_checkpoint)


def presize_bases(layers: dict[str, ForaLoraLinear], checkpoint: str | Path | None) -> int:
    """Resize each layer's ``fora_basis`` (``d_in x k``, ``k`` unknown before calibration, so ``d_in x 0`` in a fresh
    layer) to the shape stored under ``state_dict.<name>.fora_basis`` in a sharded checkpoint directory; returns how
    many were resized. A distributed load copies into the module's current tensors, so without this a resume of
    FORA-LoRA from a ``save_distributed_checkpoint=True`` checkpoint fails with "Size mismatch ... fora_basis".
    ``layers`` are named as in the LightningModule's state dict. A file checkpoint (or None) is left alone: a plain
    ``load_state_dict`` resizes the buffer itself.
    """
    if checkpoint is None or not (Path(checkpoint) / METADATA).is_file():
        return 0
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    resized = 0
    for name, layer in layers.items():
        entry = stored.get(f"state_dict.{name}.fora_basis")
        size = tuple(getattr(entry, "size", ()))
        if len(size) == 2 and size[0] == layer.in_features and size != tuple(layer.fora_basis.shape):
            layer.resize_basis_(size[1])
            resized += 1
    return resized


def presize_before_load(strategy: Any, layers: dict[str, ForaLoraLinear]) -> Callable[[], None]:
    """Make ``strategy.load_checkpoint(path, ...)`` call :func:`presize_bases` first (the Trainer restores a sharded
    checkpoint after ``on_fit_start``, and no hook sees its path before it loads); returns the undo."""
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        presize_bases(layers, checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint

    def undo() -> None:
        if vars(strategy).get("load_checkpoint") is load_checkpoint:
            del strategy.load_checkpoint

    return undo
