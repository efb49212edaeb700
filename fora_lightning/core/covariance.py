"""Streaming input covariances of linear layers: ``C = (1/N) sum_t x_t x_t^T`` over non-padding tokens.

Forward pre-hooks add ``X^T X`` of each batch to an accumulator (float32 by default) and never
store activations; :mod:`~fora_lightning.core.gram` has the product and its cheaper forms (symmetric
blocks, the activations' own GEMM dtype, token subsampling of wide inputs). Layers that read the very
same input tensor (q/k/v, gate/up) are detected on the fly and share one accumulator. Plain torch:
no Lightning import.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fora_lightning.core.early_stop import EarlyStop
from fora_lightning.core.gram import Product, gram_, mirror_

# Wraps the batches (e.g. a progress bar); must yield each one unchanged.
Progress = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass
class Covariances:
    """Uncentered second-moment sums per distinct layer input.

    ``sums[o]`` is ``sum_t x_t x_t^T`` and ``counts[o]`` the token count for owner ``o``;
    ``owner[name]`` names the layer whose accumulator ``name`` reads (itself unless shared).
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    held_out: Covariances | None = None  # the hold-out slice's sums (calibration.holdout_batch), kept apart

    def merge_held_out_(self) -> Covariances:
        """Add the held-out sums and counts back into ``sums`` / ``counts`` (the final bases use all data)."""
        if self.held_out is not None:
            for o, s in self.held_out.sums.items():
                self.sums[o].add_(s)
                self.counts[o] += self.held_out.counts[o]
            self.held_out = None
        return self

    def covariance(self, name: str) -> Tensor:
        """``C = sum / N`` for layer ``name`` (through its owner)."""
        o = self.owner[name]
        return self.sums[o] / max(self.counts[o], 1)

    def groups(self) -> dict[str, list[str]]:
        """Owner -> the layers that share its covariance, in model order."""
        out: dict[str, list[str]] = {}
        for name, o in self.owner.items():
            out.setdefault(o, []).append(name)
        return out

    def all_reduce_(self, group: Any = None) -> Covariances:
        """Sum ``sums`` and ``counts`` over the ranks of ``group`` (no-op without torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        owners = sorted(self.sums)
        for o in owners:
            torch.distributed.all_reduce(self.sums[o], group=group)
        device = self.sums[owners[0]].device if owners else "cpu"
        counts = torch.tensor([self.counts[o] for o in owners], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts, group=group)
        self.counts = {o: int(c) for o, c in zip(owners, counts.tolist())}
        if self.held_out is not None:
            self.held_out.all_reduce_(group)
        return self


def _input_key(x: Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


class CovarianceCollector:
    """Forward pre-hooks that accumulate ``X^T X`` per distinct input of the given linear layers.

    Use as a context manager (hooks are removed on exit, and with ``panel > 0`` the sums mirrored) and wrap
    each forward pass in :meth:`batch`, passing the batch's ``attention_mask`` so padding positions are skipped.
    ``panel``/``product``: see :func:`~fora_lightning.core.gram.gram_`.
    ``stop_early``: end each forward after its last target call (:mod:`~fora_lightning.core.early_stop`).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Linear],
        dtype: torch.dtype = torch.float32,
        *,
        panel: int = 0,
        product: Product = "accumulator",
        stop_early: bool = False,
    ) -> None:
        self.modules = dict(modules)
        self.early_stop = EarlyStop(self.modules, stop_early)
        self.dtype = dtype
        self.panel, self.product = panel, product
        self.result = Covariances()
        self.held_out = Covariances(owner=self.result.owner)  # batches scoped with held_out=True sum here
        self._held = False
        self._mask: Tensor | None = None
        self._seen: dict[tuple, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._unmasked: set[str] = set()
        self.finite: dict[str, Tensor] = {}  # owner -> all inputs finite so far (a device flag: no sync per batch)
        self.batches = 0

    def __enter__(self) -> CovarianceCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        if self.panel > 0:
            for acc in [*self.result.sums.values(), *self.held_out.sums.values()]:
                mirror_(acc, self.panel)

    @contextlib.contextmanager
    def batch(self, attention_mask: Tensor | None = None, held_out: bool = False) -> Iterator[None]:
        """Scope one forward pass: tokens where ``attention_mask == 0`` are excluded; ``held_out``: its sums go to
        :attr:`held_out` instead of :attr:`result`."""
        self._mask, self._held = attention_mask, held_out
        self._seen.clear()
        self.batches += 1
        try:
            with self.early_stop.batch():
                yield
        finally:
            self._mask, self._held = None, False
            self._seen.clear()

    def _tokens(self, name: str, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        mask = self._mask
        if mask is None:
            return rows
        if mask.numel() == rows.shape[0] and tuple(mask.shape) == tuple(x.shape[: mask.dim()]):
            return rows[mask.reshape(-1).to(device=x.device) != 0]
        if name not in self._unmasked:
            self._unmasked.add(name)
            warnings.warn(
                f"FORA calibration: input of '{name}' has shape {tuple(x.shape)}, which does not align with "
                f"attention_mask {tuple(mask.shape)}; all its positions are counted",
                stacklevel=2,
            )
        return rows

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            accumulate(module, args[0])
            self.early_stop.reached(name)

        def accumulate(module: nn.Module, x: Tensor) -> None:
            key = _input_key(x)
            seen = self._seen.get(key)
            if seen is not None and seen[0]() is x:
                self.result.owner.setdefault(name, seen[1])
                return
            self._seen[key] = (weakref.ref(x), name)
            owner = self.result.owner.setdefault(name, name)
            tokens = self._tokens(name, x.detach())
            finite = torch.isfinite(tokens).all()
            self.finite[owner] = finite if owner not in self.finite else self.finite[owner] & finite
            into = self.held_out if self._held else self.result
            acc = into.sums.get(owner)
            if acc is None:
                acc = into.sums[owner] = torch.zeros(
                    tokens.shape[1], tokens.shape[1], dtype=self.dtype, device=tokens.device
                )
                into.counts[owner] = 0
            gram_(acc, tokens, self.panel, self.product)
            into.counts[owner] += tokens.shape[0]

        return hook


def _pair_owners(rest: Covariances, held: Covariances) -> None:
    """Give each of ``rest`` and ``held`` a (zero) sum for every owner the other has: the two sets match on every
    rank (all-reduce) and adding back is a plain sum."""
    for a, b in ((rest, held), (held, rest)):
        for o, s in a.sums.items():
            if o not in b.sums:
                b.sums[o], b.counts[o] = torch.zeros_like(s), 0


def attention_mask_of(batch: Any) -> Tensor | None:
    """The padding mask of a calibration batch (1: a token, 0: padding), else ``None``.

    A mapping: its ``attention_mask``. A tuple or list from a tokenizer's tensors, ``(input_ids, attention_mask, ...)``
    (e.g. a ``TensorDataset(ids, mask)``, which reaches the model as ``module(input_ids, attention_mask)``): the second
    element when it looks like a mask of the first (integer ids; a bool or integer tensor of the same shape holding
    only 0 and 1). A tuple with such a mask elsewhere than second is refused (``ValueError`` saying how to pass it):
    its padding would otherwise count as data.
    """
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not _token_ids(batch[0]):
        return None
    if _is_mask_of(batch[0], batch[1]):
        return batch[1]
    elsewhere = [i for i, t in enumerate(batch[2:], start=2) if _is_mask_of(batch[0], t)]
    if elsewhere:
        raise ValueError(
            f"FORA calibration: a {type(batch).__name__} batch of {len(batch)} tensors whose element {elsewhere[0]} looks "
            "like the attention mask of the token ids in element 0; FORA reads a tuple's mask from element 1 only, and "
            "would count padding as data. Give batches as dicts {'input_ids': ..., 'attention_mask': ...}, put the mask "
            "second, or define calibration_step(self, batch) on the LightningModule"
        )
    return None


def _token_ids(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() >= 2 and not t.is_floating_point() and not t.is_complex()


def _is_mask_of(ids: Tensor, m: Any) -> bool:
    """``m`` is a 0/1 (bool or integer) tensor of ``ids``' shape."""
    if not isinstance(m, Tensor) or m.shape != ids.shape or m.is_floating_point() or m.is_complex():
        return False
    return m.dtype == torch.bool or bool(((m == 0) | (m == 1)).all())


def energy_shortfalls(
    cov: Covariances, rank_for: Callable[[str], int | None]
) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
    """Layers whose calibration cannot support their bases: ``(zero, short)``.

    ``zero``: ``(layer, tokens)`` where ``tr(C) = 0`` (every input seen was zero: no direction is the capability's);
    ``short``: ``(layer, tokens, k)`` where a fixed rank ``k = rank_for(layer)`` exceeds the ``N`` tokens counted
    (``C`` has rank <= N, so at least ``k - N`` of the protected directions carry no energy: arbitrary).
    """
    zero, short = [], []
    for name, owner in cov.owner.items():
        tokens = int(cov.counts[owner])
        if float(cov.sums[owner].diagonal().sum()) == 0.0:
            zero.append((name, tokens))
            continue
        k = rank_for(name)
        if k is not None and tokens < k:
            short.append((name, tokens, k))
    return zero, short


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; afterwards each submodule gets back its own training flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def collect_covariances(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    batches: Iterable[Any],
    forward: Callable[[Any], Any],
    *,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    panel: int = 0,
    product: Product = "accumulator",
    stop_early: bool = False,
    held_out: Callable[[int], bool] | None = None,
) -> Covariances:
    """Run ``forward(batch)`` for every batch under ``no_grad`` and ``eval`` and return the sums.

    ``forward`` receives the batch as given (move it to the device there). ``progress`` wraps the
    batches (the glue passes a progress bar; ``None``: none); ``panel``, ``product``,
    ``stop_early``: :class:`CovarianceCollector`. ``held_out(i)`` true for the i-th batch: its sums go to the
    result's ``held_out`` (every owner present in both, zeros where no batch fell; ``None``: no hold-out).
    Raises ``ValueError`` for an empty ``batches`` and for non-finite inputs (naming the layers).
    """
    collector = CovarianceCollector(modules, dtype, panel=panel, product=product, stop_early=stop_early)
    with collector, eval_mode(model), torch.no_grad():
        for i, batch in enumerate(progress(batches) if progress is not None else batches):
            with collector.batch(attention_mask_of(batch), held_out is not None and held_out(i)):
                forward(batch)
    cov = collector.result
    if held_out is not None:
        _pair_owners(cov, collector.held_out)
        cov.held_out = collector.held_out
    if collector.batches and not cov.sums:
        raise ValueError(
            f"FORA calibration ran {collector.batches} batches, but the forward pass never reached target layer(s) "
            f"{list(modules)[:5]}: their forward is never called (e.g. nn.MultiheadAttention.out_proj, whose weight "
            "is read directly by F.multi_head_attention_forward); leave them out of target_modules"
        )
    held = cov.held_out if cov.held_out is not None else Covariances()
    if not cov.sums or sum(cov.counts.values()) + sum(held.counts.values()) == 0:
        raise ValueError(
            "FORA calibration saw no tokens: the calibration loader is empty (or every position is padding). "
            "It needs at least one batch with a non-padding position of the capability to keep"
        )
    missing = [n for n in modules if n not in cov.owner]
    if missing:
        raise ValueError(f"FORA calibration: the forward pass never reached {missing[:5]}; are they used by the model?")
    bad = [
        n for n, o in cov.owner.items() if not all(torch.isfinite(c.sums[o]).all() for c in (cov, held) if o in c.sums)
    ]
    nonfinite = [n for n in bad if not bool(collector.finite[cov.owner[n]])]
    if nonfinite:
        raise ValueError(f"FORA calibration: non-finite (NaN/inf) inputs reached layer(s) {nonfinite[:5]}")
    if bad:
        raise ValueError(
            f"FORA calibration: the inputs of layer(s) {bad[:5]} are finite, but their {str(dtype).replace('torch.', '')} "
            "covariance accumulator overflowed (sum x x^T exceeds the dtype's range): set covariance_dtype='float64', "
            "or rescale the inputs"
        )
    return cov


def calibration_groups(d_in: Mapping[str, int], budget: int | None, element_size: int = 4) -> list[list[str]]:
    """Targets (name -> input width, in model order) in consecutive groups whose covariance sums fit ``budget`` bytes.

    A group's cost is bounded by ``sum d_in^2 * element_size`` over its targets (layers that share an input, q/k/v,
    share one sum: counted apart here, so the bound holds whatever is shared). Targets with the same parent module
    stay in one group, so shared inputs are still found. ``None``: one group. A parent whose targets alone exceed the
    budget forms a group of its own (the smallest the sharing allows).
    """
    names = list(d_in)
    if budget is None:
        return [names]
    parents: list[list[str]] = []
    for n in names:
        parent = n.rsplit(".", 1)[0] if "." in n else ""
        if parents and (parents[-1][0].rsplit(".", 1)[0] if "." in parents[-1][0] else "") == parent:
            parents[-1].append(n)
        else:
            parents.append([n])
    groups: list[list[str]] = []
    used = 0
    for members in parents:
        cost = sum(d_in[n] ** 2 * element_size for n in members)
        if groups and used + cost <= budget:
            groups[-1].extend(members)
            used += cost
        else:
            groups.append(list(members))
            used = cost
    return groups
