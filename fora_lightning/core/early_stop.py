"""End a calibration forward once every target layer has read its input.

The covariance pass needs the forward only up to the last target's input: what runs after it (the later
blocks, the final norm, the lm_head: ~18% of a Qwen3-1.7B forward) feeds no covariance. The first batch
runs the whole forward and counts each target's calls (the reference). If every target ran exactly once
there, each later batch raises :class:`StopForward` from the pre-hook of the call that completes the set
(its input already summed), and :meth:`EarlyStop.batch` catches it. A target called twice in the reference
(a shared layer reused in a loop) could be called again after the set is complete, so the early stop stays
off for the whole pass. Whether a strategy may be interrupted mid-forward is the glue's decision
(``fora_lightning.calibration.early_stop_safe``). Plain torch: no Lightning import.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator


class StopForward(BaseException):
    """Raised by a target's pre-hook to end a forward whose every target has been reached.

    A ``BaseException`` (as ``GeneratorExit``): a model's own ``except Exception`` does not swallow it.
    """


class EarlyStop:
    """Per-batch bookkeeping of which targets were reached; ``enabled=False``: count only, never stop.

    ``stopped``: batches ended early; ``armed``: later batches will be (decided after the first batch).
    """

    def __init__(self, names: Iterable[str], enabled: bool) -> None:
        self.names = frozenset(names)
        self.enabled = enabled
        self.armed = False
        self.stopped = 0
        self._decided = False
        self._fired = False
        self._calls: Counter[str] = Counter()

    def reached(self, name: str) -> None:
        """Record a call of target ``name`` (after its input is summed); raise :class:`StopForward` if it completes the set."""
        self._calls[name] += 1
        if self.armed and len(self._calls) == len(self.names):
            self._fired = True
            raise StopForward

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Scope one forward: swallow its :class:`StopForward`; after the first one, arm if each target ran once."""
        self._calls.clear()
        self._fired = False
        try:
            yield
        except StopForward:
            self.stopped += 1
            return
        if self._fired:
            raise RuntimeError(
                "FORA calibration: the model's forward caught the early stop's StopForward (raised by a target's "
                "pre-hook once every target had read its input) and went on running: set calibration_early_stop=False "
                "for this model"
            )
        if not self._decided:
            self._decided = True
            self.armed = self.enabled and set(self._calls) == self.names and all(c == 1 for c in self._calls.values())
