"""Progress bars for the glue's loops (tqdm), passed into ``core`` as a plain iterable wrapper."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from fora_lightning.core.covariance import Progress


def progress_bar(description: str, enabled: bool = True) -> Progress | None:
    """A :data:`~fora_lightning.core.covariance.Progress` that shows a transient tqdm bar (total from ``len`` when
    the batches have one), or ``None`` when not ``enabled`` (e.g. on ranks other than 0)."""
    if not enabled:
        return None

    def wrap(batches: Iterable[Any]) -> Iterable[Any]:
        return tqdm(batches, desc=description, leave=False)

    return wrap
