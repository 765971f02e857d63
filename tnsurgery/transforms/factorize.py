"""``factorize``: truncated-SVD low-rank factorization of ``nn.Linear`` and ``nn.Conv2d``.

A Linear's weight ``W (out, in)`` becomes ``U (out, r)`` and ``V (r, in)`` with
``U V`` the best rank-``r`` approximation of ``W`` (Eckart–Young); the
singular values are split evenly (``U = U_r √S``, ``V = √S V_rᵀ``) so both
factors train at the same scale. A Conv2d's kernel is seen as the matrix
``(out, in·kh·kw)``: ``V`` becomes a k×k conv into ``r`` channels, ``U`` a 1×1
conv to the output channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tnsurgery.decompositions.svd import compute_dtype, exact_svd, randomized_svd
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.lowrank import LowRankConv2d, LowRankLinear, conv2d_output_hw
from tnsurgery.transform import (
    Context,
    Decision,
    RankOptions,
    Transform,
    resolve_rank,
    truncation_error,
)

# Randomized SVD is used when the sketch (rank + oversampling) is at most this
# fraction of the full rank; above it an exact SVD is about as fast and exact.
RANDOMIZED_MAX_FRACTION = 0.5


class FactorizeParams(RankOptions):
    """Params of ``factorize``: one rank option, plus how to compute the SVD."""

    method: Literal["auto", "exact", "randomized"] = Field(
        "auto",
        description="SVD algorithm: 'randomized' (Halko et al., as torch.svd_lowrank) when "
        "the rank is small against the matrix, 'exact' otherwise; 'auto' chooses. energy and "
        "max_error always use the exact one, since they need the whole spectrum.",
    )
    niter: int = Field(4, ge=0, le=20, description="Power iterations of the randomized SVD.")
    oversample: int = Field(16, ge=0, description="Extra columns sketched by the randomized SVD.")
    seed: int = Field(0, description="Seed of the randomized SVD (results are deterministic).")


@dataclass
class _Svd:
    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    v: torch.Tensor  # (n, k)
    method: str


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as the matrix ``(out, in·…)`` that gets factorized."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def _choose_method(params: FactorizeParams, rank: int | None, full_rank: int) -> str:
    if params.method != "auto":
        return params.method
    if rank is None:  # the rank depends on the whole spectrum
        return "exact"
    q = rank + params.oversample
    return "randomized" if q <= RANDOMIZED_MAX_FRACTION * full_rank else "exact"


def svd(w: torch.Tensor, rank: int | None, params: FactorizeParams, values_only: bool = False):
    """Truncated SVD of ``w`` with the method ``params`` asks for (exact or randomized)."""
    m, n = w.shape
    full = min(m, n)
    method = _choose_method(params, rank, full)
    a = w.to(compute_dtype(w))
    if method == "randomized" and rank is not None:
        q = min(rank + params.oversample, full)
        return _Svd(*randomized_svd(a, q, params.niter, params.seed), "randomized")
    if values_only:
        return _Svd(None, torch.linalg.svdvals(a), None, "exact")  # type: ignore[arg-type]
    return _Svd(*exact_svd(a), "exact")


def plan(module: nn.Module, params: FactorizeParams, ctx: Context) -> Decision:
    """Resolve the rank, predict the error and the sizes, without building anything."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return Decision(
            skip_reason=f"groups={module.groups}: only groups=1 convolutions are factorized"
        )
    w = weight_matrix(module)
    m, n = w.shape
    full = min(m, n)
    dense = m * n
    per_rank = m + n
    bias = module.bias.numel() if module.bias is not None else 0
    if params.needs_spectrum:
        dec = svd(w, None, params, values_only=ctx.extras.get("plan_only", False))
        rank = resolve_rank(params, full, per_rank, dense, dec.s.square(), fixed_params=bias)
    else:
        rank = resolve_rank(params, full, per_rank, dense, fixed_params=bias)
        dec = None
    resolved = {**params.describe(), "rank": rank}
    if rank * per_rank >= dense:
        return Decision(
            resolved=resolved,
            skip_reason=(
                f"would not shrink: rank {rank} needs {rank * per_rank} weight params, "
                f"dense has {dense}"
            ),
        )
    if dec is None:
        dec = svd(w, rank, params)
    if dec.method == "exact":  # whole spectrum: take ||W||² from it too, so both agree
        total_sq = float(dec.s.double().square().sum())
    else:
        total_sq = float(w.double().square().sum())
    err = truncation_error(dec.s.square(), rank, total_sq)
    resolved["method"] = dec.method
    return Decision(
        resolved=resolved,
        params_after=rank * per_rank + bias,
        flops_after=_flops(module, rank, ctx.input_shape),
        predicted_error=err,
        state=dec,
    )


def _flops(module: nn.Module, rank: int, input_shape: tuple[int, ...] | None) -> int | None:
    if isinstance(module, nn.Linear):
        rows = 1
        for d in (input_shape or (1, module.in_features))[:-1]:
            rows *= int(d)
        return 2 * rows * rank * (module.in_features + module.out_features)
    if input_shape is None:
        return None
    n = input_shape[0] if len(input_shape) == 4 else 1
    h, w = conv2d_output_hw(module, input_shape[-2:])
    kh, kw = module.kernel_size
    return 2 * n * h * w * rank * (module.in_channels * kh * kw + module.out_channels)


def build(module: nn.Module, params: FactorizeParams, ctx: Context) -> nn.Module:
    """Make the low-rank layer from the SVD computed by :func:`plan`."""
    decision = ctx.decision if ctx.decision is not None else plan(module, params, ctx)
    if decision.skip_reason:
        raise ValueError(f"cannot factorize {ctx.name}: {decision.skip_reason}")
    rank = decision.resolved["rank"]
    dec: _Svd = decision.state
    if dec is None or dec.u is None:
        dec = svd(weight_matrix(module), rank, params)
    root = dec.s[:rank].clamp_min(0).sqrt()
    dtype, device = module.weight.dtype, module.weight.device
    u = (dec.u[:, :rank] * root).to(device=device, dtype=dtype)
    v = (dec.v[:, :rank] * root).mT.to(device=device, dtype=dtype)
    if isinstance(module, nn.Linear):
        bias = module.bias.detach() if module.bias is not None else None
        return LowRankLinear.from_factors(u, v, bias)
    return LowRankConv2d.from_factors(module, u, v)


@hookimpl
def register_transforms(register):
    """Register ``factorize``."""
    register(
        Transform(
            name="factorize",
            params_model=FactorizeParams,
            module_types=(nn.Linear, nn.Conv2d),
            build=build,
            plan=plan,
            layers=(LowRankLinear, LowRankConv2d),
            description="Truncated-SVD low-rank factorization (Linear: x·V·Uᵀ+b; "
            "Conv2d: k×k conv into r channels, then 1×1 conv).",
        )
    )
