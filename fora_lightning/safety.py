"""Settings and model shapes under which FORA would train but protect the wrong thing, or nothing: checked at fit.

- target weights shared with other parameters (tied embeddings): refused;
- other FORA / FORA-LoRA callbacks in the same Trainer: FORA instances on disjoint layers compose, the rest is refused;
- ``freeze_other=False``, and ``mode="gradient"`` under an adaptive optimizer or weight decay: a ``FORA:`` warning;
- layers that end with k = 0 (nothing protected) or k = d_in (frozen): a ``FORA:`` warning;
- calibration inputs with no energy at a layer (refused) or fewer tokens than its fixed ``rank`` (a ``FORA:`` warning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from fora_lightning.config import ForaConfig
from fora_lightning.core.covariance import Covariances, energy_shortfalls
from fora_lightning.core.subspace import LayerSubspace
from fora_lightning.core.targets import LORA_PARAMETERS

# optimizers that rescale each coordinate (the projected gradient leaves the feasible set)
ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.SparseAdam,
)


def refuse_shared_weights(model: nn.Module, targets: Mapping[str, nn.Linear], who: str) -> None:
    """``ValueError`` when a target weight is also another parameter of ``model`` (the same ``Parameter``).

    A tied ``lm_head``/``embed_tokens`` pair is the usual case: the projected update would change
    the embedding too, unprotected.
    """
    by_tensor: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(pname)
    shared = []
    for name, module in targets.items():
        others = [n for n in by_tensor.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            shared.append(f"'{name}.weight' is the same tensor as {others}")
    if shared:
        raise ValueError(
            f"{who}: target weights are shared with other parameters ({'; '.join(shared)}), e.g. tied input/output "
            "embeddings (tie_word_embeddings=True): the projected update would change them too. Leave the tied layer "
            "out of target_modules, or untie it first (model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))"
        )


def companions(trainer: Trainer, me: Callback) -> list[Callback]:
    """The other callbacks in ``trainer`` that hold a :class:`~fora_lightning.protection.Protection`."""
    return [
        cb
        for cb in trainer.callbacks
        if cb is not me and hasattr(cb, "protection") and hasattr(cb.protection, "targets")
    ]


def refuse_incompatible(me: Callback, others: Sequence[Callback]) -> None:
    """FORA instances compose with each other; FORA with FORA-LoRA, or two FORA-LoRA, are refused."""
    for other in others:
        if type(other) is not type(me) or type(me).__name__ != "FORA":
            raise ValueError(
                f"{type(me).__name__} and {type(other).__name__} are both in this Trainer: each freezes the other's "
                "parameters, so one of them would train nothing. Use one of them (FORA instances on disjoint layers compose)"
            )


def refuse_overlap(mine: Mapping[str, nn.Linear], theirs: Mapping[str, nn.Linear]) -> None:
    """Two FORA callbacks may not project the same layer."""
    overlap = sorted(set(mine) & set(theirs))
    if overlap:
        raise ValueError(
            f"two FORA callbacks both target {overlap[:5]}: give each its own layers (disjoint target_modules)"
        )


def warn_at_fit_start(
    trainer: Trainer, pl_module: nn.Module, config: ForaConfig, targets: Mapping[str, nn.Linear], who: str
) -> None:
    """``FORA:`` warnings for settings that train outside the protected set (see ``docs/errors.md``)."""
    if not config.freeze_other:
        target_ids = {id(m.weight) for m in targets.values()}
        free = [
            n
            for n, p in pl_module.named_parameters()
            if p.requires_grad and id(p) not in target_ids and n.rpartition(".")[2] not in LORA_PARAMETERS
        ]
        if free:
            rank_zero_warn(
                f"FORA: freeze_other=False: {len(free)} non-target parameter tensors ({free[:3]} ...) train unprotected; "
                "the kept capability's outputs can change through them (biases, norms, embeddings)"
            )
    if config.mode != "gradient" or config.is_lora:
        return
    target_ids = {id(m.weight) for m in targets.values()}
    for optimizer in trainer.optimizers:
        groups = [g for g in optimizer.param_groups if any(id(p) in target_ids for p in g["params"])]
        decay = any(g.get("weight_decay", 0.0) for g in groups)
        adaptive = isinstance(optimizer, ADAPTIVE) or any("betas" in g for g in groups)
        if groups and (adaptive or decay):
            why = " and ".join(
                [f"{type(optimizer).__name__} rescales each coordinate"] * adaptive + ["weight decay pulls W"] * decay
            )
            rank_zero_warn(
                f"FORA: {who} mode='gradient' with {why}: the step leaves the protected set, so the kept capability's "
                "outputs drift. Use mode='update' (re-projects after each step), or plain SGD without weight decay"
            )


def warn_extreme_ranks(subspaces: Mapping[str, LayerSubspace], config: ForaConfig, who: str) -> None:
    """``FORA:`` warning naming layers with k = 0 (nothing protected) or k = d_in (the layer cannot change)."""
    full = [n for n, s in subspaces.items() if s.k == s.d_in]
    empty = [n for n, s in subspaces.items() if s.k == 0] if config.source != "none" else []
    if full:
        rank_zero_warn(
            f"FORA: {who} layers {full[:5]}{' ...' if len(full) > 5 else ''} keep k = d_in (energy={config.energy}, "
            f"rank={config.rank}): every input direction is protected, so they cannot change outside the r-dim channel; "
            "lower energy or rank"
        )
    if empty:
        rank_zero_warn(f"FORA: {who} layers {empty[:5]} have k = 0: nothing of the kept capability is protected there")


def check_calibration_energy(cov: Covariances, config: ForaConfig, who: str) -> None:
    """Refuse layers whose calibration inputs were all zero; warn where a fixed ``rank`` exceeds the tokens counted."""

    def fixed_rank(name: str) -> int | None:
        return None if isinstance(config.rank, Mapping) and name not in config.rank else config.rank_for(name)

    zero, short = energy_shortfalls(cov, fixed_rank)
    if zero:
        listed = ", ".join(f"'{n}' ({t:,} tokens)" for n, t in zero[:5])
        raise ValueError(
            f"FORA: {who} calibration gave zero energy (tr C = 0: every input was zero) at {listed}: no direction is the "
            "kept capability's there, so its basis would be arbitrary. Check that the calibration batches reach these "
            "layers with real inputs (not only padding or masked positions), or leave them out of target_modules"
        )
    if short:
        listed = ", ".join(f"'{n}' ({t:,} tokens, rank={k})" for n, t, k in short[:5])
        rank_zero_warn(
            f"FORA: {who} calibration has fewer tokens than the requested rank at {listed}{' ...' if len(short) > 5 else ''}: "
            "C has rank <= tokens, so the directions past it carry no energy and are chosen arbitrarily. Give more "
            "calibration data, or a rank <= the token count (or energy= instead of rank)"
        )
