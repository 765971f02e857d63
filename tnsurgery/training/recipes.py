"""Staged training recipes applied inside the loop: progressive rank (cut the ranks
in stages), progressive unfreezing (last layers first), and TT-layer hygiene (core
norm clipping and normalization, re-orthogonalization, ``tt_stats`` logging)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tnsurgery.errors import UserInputError
from tnsurgery.layer import SurgeryLayer
from tnsurgery.spec import Training, TTOptions


def shrink_at(opts: Training, step: int) -> bool:
    """Whether a progressive-rank stage begins at ``step`` (not the first stage)."""
    stages = opts.progressive_rank.stages
    return step > 0 and any(step == k * opts.steps // stages for k in range(1, stages))


@torch.no_grad()
def shrink(model: nn.Module, names: list[str], opts: Training, step: int) -> None:
    """Cut every surgered layer with ranks to cut (:meth:`SurgeryLayer.cuttable_ranks`
    not ``None``: LowRankLinear, TTLinear, plugin layers that opt in) to its stage's
    ranks, a fraction of the ranks it had at the first cut."""
    pr = opts.progressive_rank
    modules = dict(model.named_modules())
    cuttable = {
        n: modules[n]
        for n in names
        if isinstance(modules.get(n), SurgeryLayer) and modules[n].cuttable_ranks() is not None
    }
    if not cuttable:
        raise UserInputError(
            "training: progressive_rank cuts LowRankLinear (factorize on Linear) and TTLinear "
            "layers; this model has none it can cut (qat-wrapped layers are not cut)"
        )
    reached = [k for k in range(1, pr.stages) if step >= k * opts.steps // pr.stages]
    if not reached:
        return
    stage = max(reached)
    fraction = pr.final ** (stage / (pr.stages - 1))  # of the start ranks
    start = model.__dict__.setdefault("_start_ranks", {})
    for name, layer in cuttable.items():
        r0 = start.setdefault(name, list(layer.cuttable_ranks()))
        if isinstance(r0, int):  # a checkpoint written when a low-rank layer's was an int
            r0 = [r0]
        layer.cut_ranks_(tuple(max(1, round(r * fraction)) for r in r0))


def unfreeze(model: nn.Module, names: list[str], opts: Training, step: int) -> None:
    """Progressive unfreezing: at ``step``, train the last ``k/N`` of the surgered
    layers (``names`` in the model's module order, which follows the forward pass in
    sequential models), ``k`` the current stage (1-based)."""
    stages = opts.unfreeze_stages
    stage = min(stages, step * stages // opts.steps + 1)
    keep = max(1, math.ceil(len(names) * stage / stages))
    modules = dict(model.named_modules())
    for i, name in enumerate(names):
        if name in modules:
            for p in modules[name].parameters():
                p.requires_grad_(i >= len(names) - keep)


@torch.no_grad()
def tt_hygiene(model: nn.Module, tt: TTOptions, step: int) -> dict[str, Any]:
    """Apply the TT options to every layer after an optimizer step, through the
    :class:`SurgeryLayer` hooks (``clip_norms_``, ``balance_norms_``,
    ``reorthogonalize_``, ``training_stats``; they do nothing on layers without
    factors to tend, so in practice on TT layers); returns what to log."""
    if tt == type(tt)():  # nothing asked: no walk over the model each step
        return {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SurgeryLayer)]
    logged: dict[str, Any] = {}
    for name, layer in layers:
        if tt.clip_core_norm is not None:
            layer.clip_norms_(tt.clip_core_norm)
        if tt.normalize_cores:
            layer.balance_norms_()
        if tt.reorthogonalize_every and step % tt.reorthogonalize_every == 0:
            layer.reorthogonalize_()
        if tt.log_stats_every and step % tt.log_stats_every == 0:
            stats = layer.training_stats()
            if stats is not None:
                logged[f"tt_stats.{name}"] = stats
    return logged
