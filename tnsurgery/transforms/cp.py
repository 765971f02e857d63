"""``cp``: CP-decomposed ``nn.Conv2d`` (Lebedev et al. 2015), initialized by CP-ALS.

The kernel ``W (out, in, kh, kw)`` is approximated by a rank-``R`` CP tensor,
``W ≈ Σ_r U_out[:, r] ∘ U_in[:, r] ∘ U_h[:, r] ∘ U_w[:, r]``, found by CP-ALS
(:func:`tnsurgery.decompositions.cp.cp_als`, HOSVD start, float64), and the conv
becomes four thin ones (:class:`~tnsurgery.layers.cp.CPConv2d`): 1×1 into ``R``
channels, ``kh×1`` and ``1×kw`` depthwise, 1×1 to the outputs with the bias.
Each of the four factors gets ``λ_r^{1/4}`` of a term's weight, so all train at
the same scale. A rank-``R`` layer holds ``R·(in + out + kh + kw)`` weights.

CP-ALS is a local method with no optimality guarantee: the plan reports the fit
it reached (``1 - ‖W - Ŵ‖/‖W‖``) and the iterations it ran, and the layer is
skipped with the reason when the fit is below ``min_fit``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from tnsurgery.decompositions.cp import CPResult, cp_als
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.cp import CPConv2d
from tnsurgery.transform import (
    Context,
    Decision,
    RankOptions,
    Transform,
    build_from_plan,
    relative_error,
    resolve_rank,
)


class CPParams(RankOptions):
    """Params of ``cp``: one rank option, and how to run CP-ALS.

    How the shared rank options read for a CP kernel:

    - ``rank``: the CP rank ``R``.
    - ``rank_ratio``: fraction of the kernel's largest possible CP rank,
      ``out·in·kh·kw / max(out, in, kh, kw)`` (every 4-way tensor has a CP
      decomposition of that rank).
    - ``param_ratio``: the largest ``R`` whose ``R·(in + out + kh + kw)`` weights,
      plus the bias, fit in that fraction of the conv's weights plus bias.
    - ``max_error``: the smallest rank whose CP-ALS error (relative Frobenius, in
      float64) is at most ``max_error``, searched over the ranks that shrink the
      layer by doubling from 1, then bisecting. ALS errors are not guaranteed to
      fall with the rank, so this is the smallest rank the search found.
    - ``energy``: as ``max_error = sqrt(1 - energy)``, the error a truncated SVD
      keeping that fraction of the squared singular values would have (CP has no
      spectrum of its own).
    """

    als_iters: int = Field(100, ge=1, le=100_000, description="Most CP-ALS sweeps.")
    tol: float = Field(
        1e-7, ge=0, description="Stop CP-ALS when the fit changes by less than this in a sweep."
    )
    seed: int = Field(
        0,
        description="Seeds the start of the factors that the HOSVD cannot fill (a mode "
        "shorter than the rank); results are deterministic for a seed.",
    )
    min_fit: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Skip the layer (with the reason) when the fit 1 - ||W - W_cp|| / ||W|| "
        "of the built layer is below this: at the default 0.1 the CP kernel keeps so little "
        "of the weight that the layer is as good as dropped.",
    )


def _sizes(module: nn.Conv2d) -> tuple[int, int, int]:
    """``(dense weight params, weight params per unit of rank, bias params)``."""
    kh, kw = module.kernel_size
    dense = module.weight.numel()
    per_rank = module.in_channels + module.out_channels + kh + kw
    bias = module.bias.numel() if module.bias is not None else 0
    return dense, per_rank, bias


def _decompose(w: torch.Tensor, rank: int, params: CPParams) -> CPResult:
    return cp_als(w, rank, max_iter=params.als_iters, tol=params.tol, seed=params.seed)


def _search(
    w: torch.Tensor, max_error: float, largest: int, params: CPParams
) -> tuple[int, CPResult, dict[int, float]]:
    """The smallest rank in ``[1, largest]`` meeting ``max_error`` that doubling then
    bisection find, its decomposition, and every rank tried with its error; when even
    ``largest`` misses, that rank and its decomposition."""
    tried: dict[int, CPResult] = {}

    def meets(rank: int) -> bool:
        if rank not in tried:
            tried[rank] = _decompose(w, rank, params)
        return tried[rank].error <= max_error + 1e-12

    lo, hi = 0, 1  # invariant: lo misses (0: no rank), hi is the next candidate
    while not meets(hi):
        if hi == largest:
            return hi, tried[hi], {r: res.error for r, res in tried.items()}
        lo, hi = hi, min(2 * hi, largest)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried[hi], {r: res.error for r, res in tried.items()}


def _layer(module: nn.Conv2d, res: CPResult) -> CPConv2d:
    """The :class:`CPConv2d` of a decomposition, in the module's dtype and on its device."""
    share = res.weights.clamp_min(0) ** 0.25  # each factor carries λ^(1/4)
    dtype, device = module.weight.dtype, module.weight.device
    out_f, in_f, h_f, w_f = ((f * share).to(device=device, dtype=dtype) for f in res.factors)
    return CPConv2d.from_factors(module, out_f, in_f, h_f, w_f)


def plan(module: nn.Module, params: CPParams, ctx: Context) -> Decision:
    """Run CP-ALS at the resolved rank, build the layer, and measure its exact error."""
    if module.groups != 1:
        return Decision(
            skip_reason=f"groups={module.groups}: only groups=1 convolutions are CP-decomposed"
        )
    w = module.weight.detach()
    dense, per_rank, bias = _sizes(module)
    full = dense // max(w.shape)  # the largest CP rank any kernel of this shape needs
    shrinking = (dense - 1) // per_rank  # the largest rank with fewer weights than dense
    resolved: dict = dict(params.describe())
    if params.needs_spectrum:
        if params.max_error is not None:
            target = params.max_error
        else:
            target = math.sqrt(max(0.0, 1.0 - params.energy))
            resolved["max_error"] = target
        if shrinking < 1:
            return Decision(
                resolved=resolved,
                skip_reason=f"would not shrink: rank 1 needs {per_rank} weight params, "
                f"dense has {dense}",
            )
        rank, res, tried = _search(w, target, min(shrinking, full), params)
        resolved["search"] = [[r, tried[r]] for r in sorted(tried)]
        if res.error > target + 1e-12:
            resolved.update(rank=rank, fit=res.fit, iterations=res.iterations)
            return Decision(
                resolved=resolved,
                skip_reason=f"no rank that shrinks the layer reaches max_error {target:.4g}: "
                f"CP-ALS at rank {rank} reaches {res.error:.4g}",
            )
    else:
        rank = resolve_rank(params, full, per_rank, dense, fixed_params=bias)
        res = None
    resolved["rank"] = rank
    if rank * per_rank >= dense:
        return Decision(
            resolved=resolved,
            skip_reason=f"would not shrink: rank {rank} needs {rank * per_rank} weight params, "
            f"dense has {dense}",
        )
    if res is None:
        res = _decompose(w, rank, params)
    resolved.update(fit=res.fit, iterations=res.iterations, converged=res.converged)
    if not math.isfinite(res.fit):
        return Decision(
            resolved=resolved,
            skip_reason=f"CP-ALS at rank {rank} gave no finite fit (is the weight finite?)",
        )
    layer = _layer(module, res)
    with torch.no_grad():
        err = relative_error(layer.to_dense(), w)
    fit = 1.0 - err  # of the layer as built: in its dtype, as surgery will measure it
    if not fit >= params.min_fit:
        return Decision(
            resolved=resolved,
            skip_reason=f"CP-ALS reached a fit of {fit:.4f} at rank {rank} after "
            f"{res.iterations} iterations, below min_fit {params.min_fit}: raise the rank "
            "or lower min_fit",
        )
    return Decision(
        resolved=resolved,
        params_after=rank * per_rank + bias,
        flops_after=layer.flops(ctx.input_shape) if ctx.input_shape is not None else None,
        predicted_error=err,
        state=layer,
    )


build = build_from_plan("cp", plan)


@hookimpl
def register_transforms(register):
    """Register ``cp``."""
    register(
        Transform(
            name="cp",
            params_model=CPParams,
            module_types=(nn.Conv2d,),
            build=build,
            plan=plan,
            layers=(CPConv2d,),
            description="CP-decomposed Conv2d by CP-ALS (Lebedev et al. 2015): 1x1 into "
            "rank R, kh x 1 and 1 x kw depthwise, 1x1 out.",
        )
    )
