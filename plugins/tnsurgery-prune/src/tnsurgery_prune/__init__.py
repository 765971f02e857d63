"""``prune``: magnitude pruning of ``nn.Linear`` and ``nn.Conv2d``, as a tnsurgery plugin.

The ``round(sparsity · n)`` weights of smallest magnitude are set to zero
(``scope="layer"``: over the whole weight; ``scope="row"``: in each output
row / output channel separately) and kept at zero by a mask. Ties are broken
by position, so the result is deterministic.

This package is the example plugin: one hook implementation
(:func:`register_transforms`), one params model, a ``plan`` that predicts the
result exactly, a ``build`` that makes the layer, and the layers in
:mod:`tnsurgery_prune.layers`. It is found through the ``tnsurgery``
entry-point group declared in its ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import tnsurgery
from tnsurgery.layers.lowrank import conv2d_output_hw
from tnsurgery.transform import Context, Decision, Transform
from tnsurgery_prune.layers import PrunedConv2d, PrunedLinear

__all__ = ["PruneParams", "PrunedConv2d", "PrunedLinear", "build", "plan", "prune_mask"]


class PruneParams(BaseModel):
    """Params of ``prune``."""

    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(
        ..., gt=0, lt=1, description="Fraction of the weights to set to zero (0 < s < 1)."
    )
    scope: Literal["layer", "row"] = Field(
        "layer",
        description="'layer': prune the smallest weights of the whole weight tensor; "
        "'row': the same fraction in each output row (Conv2d: each output channel).",
    )


def prune_mask(weight: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Boolean mask of ``weight``'s shape, ``False`` on the weights to prune.

    ``scope="layer"`` prunes ``round(sparsity · weight.numel())`` weights,
    ``scope="row"`` prunes ``round(sparsity · row_size)`` in every output row,
    always those of smallest magnitude (ties: the first in memory order).
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    rows = w.reshape(1, -1) if scope == "layer" else w
    k = round(sparsity * rows.shape[1])
    order = torch.sort(rows.abs(), dim=1, stable=True).indices[:, :k]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask.scatter_(1, order, False)
    return mask.reshape(weight.shape)


def plan(module: nn.Module, params: PruneParams, ctx: Context) -> Decision:
    """Choose the weights to prune; predict parameters, FLOPs and the exact weight error."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return Decision(skip_reason=f"padding_mode='{module.padding_mode}' is not supported")
    w = module.weight.detach()
    mask = prune_mask(w, params.sparsity, params.scope)
    kept = int(mask.sum())
    pruned = mask.numel() - kept
    resolved = {"sparsity": params.sparsity, "scope": params.scope, "pruned": pruned}
    if pruned == 0:
        return Decision(
            resolved=resolved,
            skip_reason=f"sparsity {params.sparsity} prunes no weight of this layer "
            f"(scope '{params.scope}')",
        )
    # The error is exactly the norm of what is removed: ‖W ⊙ ¬mask‖ / ‖W‖.
    w64 = w.double()
    total = float(w64.norm())
    removed = float(w64[~mask].norm())
    bias = module.bias.numel() if module.bias is not None else 0
    return Decision(
        resolved=resolved,
        params_after=kept + bias,
        flops_after=_flops(module, kept, ctx.input_shape),
        predicted_error=removed / total if total > 0 else 0.0,
        state=mask,
    )


def _flops(module: nn.Module, kept: int, input_shape: tuple[int, ...] | None) -> int | None:
    if isinstance(module, nn.Linear):
        rows = 1
        for d in (input_shape or (1, module.in_features))[:-1]:
            rows *= int(d)
        return 2 * rows * kept
    if input_shape is None:
        return None
    n = input_shape[0] if len(input_shape) == 4 else 1
    h, w = conv2d_output_hw(module, input_shape[-2:])
    return 2 * n * h * w * kept


def build(module: nn.Module, params: PruneParams, ctx: Context) -> nn.Module:
    """Make the pruned layer with the mask chosen by :func:`plan`."""
    decision = ctx.decision if ctx.decision is not None else plan(module, params, ctx)
    mask = decision.state
    if mask is None:  # planned elsewhere (e.g. restored): choose again, deterministically
        mask = prune_mask(module.weight, params.sparsity, params.scope)
    if isinstance(module, nn.Linear):
        return PrunedLinear.from_dense(module, mask)
    return PrunedConv2d.from_dense(module, mask)


@tnsurgery.hookimpl
def register_transforms(register):
    """Register ``prune``."""
    register(
        Transform(
            name="prune",
            params_model=PruneParams,
            module_types=(nn.Linear, nn.Conv2d),
            build=build,
            plan=plan,
            layers=(PrunedLinear, PrunedConv2d),
            description="Magnitude pruning: the smallest weights set to zero and kept at "
            "zero by a mask (weight * mask in forward).",
        )
    )
