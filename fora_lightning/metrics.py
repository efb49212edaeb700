"""Preservation metrics as ``torchmetrics.Metric`` subclasses (sum states, reduced with ``dist_reduce_fx="sum"``).

- :func:`leakage` / :class:`LayerLeakage`: per-layer ``||(W - W0) X|| / ||W0 X||`` on held-out inputs of the kept
  capability (one layer at once / summed over batches and ranks);
- :class:`TokenKL`: mean per-token ``KL(p_base || p_tuned)`` of next-token distributions, padding masked;
- :class:`CausalPerplexity`: torchmetrics' ``Perplexity`` fed with shifted causal-LM logits and labels;
- :class:`ExactMatch`: exact-match accuracy of generated answers (whitespace-normalised strings).

Every state is a sum (never a mean), so ``compute`` after a cross-rank sum is exact under DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.text import Perplexity

from fora_lightning.core.targets import weight_matrix

IGNORE_INDEX = -100


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace and strip the ends: the default comparison for exact match."""
    return " ".join(text.split())


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` as (tokens x features), keeping only positions where ``mask != 0`` when a mask is given."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    return rows[mask.reshape(-1).to(rows.device) != 0]


def leakage_terms(x: Tensor, delta_w: Tensor, w0: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(||X (W - W0)^T||_F^2, ||X W0^T||_F^2)`` in float64 for inputs ``x`` (``... x d_in``, padding masked)."""
    xs = _rows(x.detach(), mask).double()
    w0d = w0.detach().to(xs.device).double()
    return (xs @ delta_w.detach().to(xs.device).double().T).square().sum(), (xs @ w0d.T).square().sum()


def leakage(delta_w: Tensor, w0: Tensor, x: Tensor, mask: Tensor | None = None) -> float:
    """``||(W - W0) X|| / ||W0 X||`` (Frobenius, float64) for one layer: ``delta_w = W - W0``, ``x`` its inputs as rows."""
    return float(_ratio(*leakage_terms(x, delta_w, w0, mask)))


def _ratio(delta_sq: Tensor, base_sq: Tensor) -> Tensor:
    return (delta_sq / base_sq.clamp_min(1e-300)).sqrt()


class LayerLeakage(Metric):
    r"""Per-layer relative leakage of the update on held-out inputs of the kept capability.

    .. math:: \mathrm{leak}_\ell = \frac{\| (W_\ell - W_{0,\ell}) X_\ell \|_F}{\| W_{0,\ell} X_\ell \|_F}

    States are the two squared norms per layer (float64 sums), so the ratio is exact over batches
    and ranks. ``compute`` returns a ``(n_layers,)`` tensor in the order of ``layers``;
    :meth:`as_dict` names them. Use :meth:`probe` to feed it from forward pre-hooks.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, layers: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not layers:
            raise ValueError("LayerLeakage needs at least one layer name")
        self.layers = list(layers)
        self._index = {name: i for i, name in enumerate(self.layers)}
        n = len(self.layers)
        self.add_state("delta_sq", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("base_sq", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, layer: str, x: Tensor, weight: Tensor, w0: Tensor, mask: Tensor | None = None) -> None:
        """Add ``||X (W - W0)^T||^2`` and ``||X W0^T||^2`` for one layer's inputs ``x`` (``... x d_in``)."""
        i = self._index[layer]
        delta_sq, base_sq = leakage_terms(
            x, weight.detach().double() - w0.detach().to(weight.device).double(), w0, mask
        )
        self.delta_sq[i] += delta_sq
        self.base_sq[i] += base_sq

    def compute(self) -> Tensor:
        return _ratio(self.delta_sq, self.base_sq)

    def as_dict(self) -> dict[str, float]:
        """``compute()`` keyed by layer name."""
        return dict(zip(self.layers, self.compute().reshape(-1).tolist()))

    @contextlib.contextmanager
    def probe(
        self,
        modules: Mapping[str, nn.Module],
        base_weights: Mapping[str, Tensor],
        weights: Mapping[str, Tensor] | None = None,
    ) -> Iterator[LeakageProbe]:
        """Forward pre-hooks on ``modules`` that update this metric with each layer's input ``X``.

        ``W`` is ``weights[name]`` when given (e.g. the tuned model's, while ``modules`` belong to the
        base model, so ``X`` are the base model's inputs), else the hooked module's own ``weight``.
        Inside the block, wrap each forward in ``probe.batch(attention_mask)`` to skip padding.
        """
        probe = LeakageProbe(self, modules, base_weights, weights)
        try:
            yield probe
        finally:
            probe.remove()


class LeakageProbe:
    """The hooks behind :meth:`LayerLeakage.probe` (one per layer; the current mask is shared)."""

    def __init__(
        self,
        metric: LayerLeakage,
        modules: Mapping[str, nn.Module],
        base_weights: Mapping[str, Tensor],
        weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.metric = metric
        self.mask: Tensor | None = None
        self._handles = [
            m.register_forward_pre_hook(
                self._hook(name, m, base_weights[name], None if weights is None else weights[name])
            )
            for name, m in modules.items()
        ]

    @contextlib.contextmanager
    def batch(self, attention_mask: Tensor | None = None) -> Iterator[None]:
        self.mask = attention_mask
        try:
            yield
        finally:
            self.mask = None

    def _hook(self, name: str, module: nn.Module, w0: Tensor, weight: Tensor | None):
        def hook(_: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = self.mask if self.mask is not None and self.mask.numel() * x.shape[-1] == x.numel() else None
            self.metric.update(name, x, weight_matrix(module) if weight is None else weight, w0, mask)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class TokenKL(Metric):
    r"""Mean per-token ``KL(p_base || p_tuned)`` of next-token distributions on the kept capability's data.

    .. math:: \mathrm{KL} = \frac{1}{|T|} \sum_{t \in T} \sum_v p_{b,t}(v) \,(\log p_{b,t}(v) - \log p_{\theta,t}(v))

    over non-padding positions ``T`` (``attention_mask != 0``), in nats. Computed in float32 or
    float64 from logits; states are the KL sum and the token count.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, base_logits: Tensor, tuned_logits: Tensor, attention_mask: Tensor | None = None) -> None:
        """``base_logits`` and ``tuned_logits``: ``(batch, seq, vocab)``; ``attention_mask``: ``(batch, seq)``."""
        if base_logits.shape != tuned_logits.shape:
            raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(tuned_logits.shape)}")
        dt = torch.float64 if base_logits.dtype == torch.float64 else torch.float32
        b = _rows(base_logits.detach(), attention_mask).to(dt).log_softmax(-1)
        t = _rows(tuned_logits.detach(), attention_mask).to(dt).log_softmax(-1)
        self.kl_sum += (b.exp() * (b - t)).sum().double()
        self.tokens += b.shape[0]

    def compute(self) -> Tensor:
        return self.kl_sum / self.tokens.clamp_min(1)


class CausalPerplexity(Perplexity):
    r"""torchmetrics' ``Perplexity`` for causal LMs: ``exp(-(1/N) sum_t log p(x_{t+1} | x_{<=t}))``.

    ``update(logits, input_ids, attention_mask)`` shifts by one position, so logits at ``t`` score
    token ``t + 1``; targets at padding positions (``attention_mask == 0``) or marked ``-100`` in
    ``labels`` are ignored. States (total log-prob, count) are torchmetrics' sum states.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(ignore_index=IGNORE_INDEX, **kwargs)

    def update(  # type: ignore[override]
        self, logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> None:
        target = (labels if labels is not None else input_ids)[:, 1:].clone()
        if attention_mask is not None:
            target[attention_mask[:, 1:] == 0] = IGNORE_INDEX
        super().update(logits[:, :-1].detach().float(), target)


class ExactMatch(Metric):
    """Fraction of generated answers equal to the reference after ``normalize_whitespace`` (as :func:`~fora_lightning.llm.generation.exact_match`)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} references")
        self.correct += sum(normalize_whitespace(p) == normalize_whitespace(t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> Tensor:
        return self.correct / self.total.clamp_min(1)
