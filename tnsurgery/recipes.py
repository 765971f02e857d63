"""Staged training recipes applied inside the loop: progressive rank (cut the ranks
in stages), progressive unfreezing (last layers first), and TT-layer hygiene (core
norm clipping and normalization, re-orthogonalization, ``tt_stats`` logging)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tnsurgery.errors import UserInputError

if TYPE_CHECKING:
    from tnsurgery.training import Training, TTOptions


def shrink_at(opts: Training, step: int) -> bool:
    """Whether a progressive-rank stage begins at ``step`` (not the first stage)."""
    stages = opts.progressive_rank.stages
    return step > 0 and any(step == k * opts.steps // stages for k in range(1, stages))


@torch.no_grad()
def shrink(model: nn.Module, names: list[str], opts: Training, step: int) -> None:
    """Cut every surgered LowRankLinear/TTLinear to its stage's ranks."""
    from tnsurgery.layers.lowrank import LowRankLinear
    from tnsurgery.layers.tt import TTLinear

    pr = opts.progressive_rank
    modules = dict(model.named_modules())
    cuttable = [n for n in names if isinstance(modules.get(n), (LowRankLinear, TTLinear))]
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
    for name in cuttable:
        layer = modules[name]
        if isinstance(layer, LowRankLinear):
            r0 = start.setdefault(name, layer.rank)
            layer.truncate_(max(1, round(r0 * fraction)))
        elif isinstance(layer, TTLinear):
            r0 = start.setdefault(name, layer.ranks[1:-1])
            layer.round_(max_rank=[max(1, round(r * fraction)) for r in r0])


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
    """Apply the TT options to every TT layer after an optimizer step; returns what
    to log."""
    from tnsurgery.layers.tt import TTLinear
    from tnsurgery.training import TTOptions

    if tt == TTOptions():  # nothing asked: no walk over the model each step
        return {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TTLinear)]
    logged: dict[str, Any] = {}
    for name, layer in layers:
        cores = list(layer.cores)
        if tt.clip_core_norm is not None:
            for c in cores:
                norm = float(c.norm())
                if norm > tt.clip_core_norm:
                    c.mul_(tt.clip_core_norm / norm)
        if tt.normalize_cores:
            norms = [float(c.norm()) for c in cores]
            if all(v > 0 for v in norms):
                target = math.prod(norms) ** (1.0 / len(norms))
                for c, v in zip(cores, norms, strict=True):
                    c.mul_(target / v)
        if tt.reorthogonalize_every and step % tt.reorthogonalize_every == 0:
            layer.orthogonalize_("left")
        if tt.log_stats_every and step % tt.log_stats_every == 0:
            logged[f"tt_stats.{name}"] = layer.tt_stats()
    return logged
