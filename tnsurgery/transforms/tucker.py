"""``tucker``: Tucker decomposition of ``nn.Conv2d`` kernels and tensorized ``nn.Linear``
weights, by HOSVD refined with HOOI.

A Conv2d's kernel ``W (out, in, kh, kw)`` gets factors on its two channel
modes only (Tucker-2, Kim et al. 2016): ``W ≈ G ×_out U_out ×_in U_in`` with
``G (r_out, r_in, kh, kw)``, which runs as a 1×1 conv to ``r_in`` channels,
the k×k core conv, and a 1×1 conv to ``out`` channels.

A Linear's weight ``W (out, in)`` is reshaped to ``(m_1..m_d, n_1..n_d)``
(factors chosen as for ``tt``, zero-padded when the sizes do not factor) and
every one of the 2d modes gets a factor; the forward contracts the input
through the input factors, the core and the output factors in turn.

The ranks start from the truncated HOSVD (the leading singular vectors of
each unfolding) and are refined by ``hooi_iters`` sweeps of HOOI, which only
ever lowers the error. The predicted error is measured on the built layer's
dense weight, so it is the error surgery then reports.

Data-aware Linear (``whiten``, with a spec-level calibration): as for ``tt``,
the input second moment ``C`` is approximated by a Kronecker product
``C_1 ⊗ … ⊗ C_d`` over the input modes (partial traces; zero-padded positions
count as inputs of mean energy), ``C_k = L_k L_kᵀ``, and HOSVD/HOOI run on the
whitened tensor ``W ×_{n_k} L_kᵀ``; each input factor ``U_k`` then becomes
``L_k⁻ᵀ U_k`` (no longer orthonormal), so shapes and parameter count are
unchanged. ``energy``/``max_error`` bound the whitened error
``‖(W − Ŵ) L‖ / ‖W L‖`` (the output error when ``C`` is Kronecker-structured);
``predicted_output_error`` is measured against the exact ``C``. Conv2d layers
are not whitened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from tnsurgery.decompositions.factors import linear_modes
from tnsurgery.decompositions.svd import compute_dtype
from tnsurgery.decompositions.tucker import Tucker, feasible_ranks, hooi, hosvd
from tnsurgery.decompositions.whitening import input_whitening
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.tucker import TuckerConv2d, TuckerLinear
from tnsurgery.transform import (
    RANK_OPTIONS,
    Context,
    Decision,
    ModeOptions,
    Transform,
    build_from_plan,
    relative_error,
)

# one entry of ``ranks``: a rank (int >= 1) or a fraction of the mode's largest rank
RankValue = Annotated[int, Field(strict=True, ge=1)] | Annotated[float, Field(gt=0, le=1)]


class TuckerParams(ModeOptions):
    """Params of ``tucker``: the ranks (``ranks``, or one shared rank option), HOOI sweeps,
    and for a Linear how its dimensions are split into modes.

    Every rank is clamped to what its mode allows: its size, the product of
    the other modes' sizes, and (lossless) the product of the other ranks.

    - ``ranks``: ``[r_out, r_in]``; each an int, or a fraction in (0, 1] of the
      mode's largest rank (rounded half up). On a Linear, ``r_out`` applies to
      every output mode and ``r_in`` to every input mode, or give 2d values
      (output modes, then input modes).
    - ``rank``: the same rank for every decomposed mode.
    - ``rank_ratio``: the same fraction of every mode's largest rank.
    - ``param_ratio``: the largest ranks, each the same fraction of its mode's
      largest rank (rounded down, at least 1), whose parameters fit that
      fraction of the layer's (the bias counts on both sides).
    - ``max_error``: each decomposed mode keeps the fewest singular values of
      its unfolding whose dropped tail is at most ``max_error·‖W‖/√N`` (N
      modes), which guarantees a relative Frobenius error <= ``max_error``.
    - ``energy``: the same with ``max_error = sqrt(1 - energy)``: the
      approximation keeps at least that fraction of ``‖W‖²``.
    - ``whiten`` (Linear only): with calibration statistics of the layer's
      inputs, HOSVD/HOOI of the whitened weight ``W·L``, ``L = L_1 ⊗ … ⊗ L_d``
      from a Kronecker factoring of the input second moment over the input
      modes, each input factor mapped back by ``L_k⁻ᵀ``: the layer's output on
      the data is what is kept; ``max_error``/``energy`` then refer to ``W·L``.
    """

    rank_fields = (*RANK_OPTIONS, "ranks")

    ranks: list[RankValue] | None = Field(
        None,
        description="Tucker ranks [r_out, r_in] (Linear: or one per mode, output modes first); "
        "ints, or fractions in (0, 1] of each mode's largest rank.",
    )
    hooi_iters: int = Field(
        5, ge=0, le=100, description="HOOI sweeps refining the HOSVD (0: plain HOSVD)."
    )
    d: int = Field(
        2,
        ge=1,
        le=8,
        description="Linear only: modes per side (out and in) when factors are not given.",
    )

    whiten: bool = Field(
        True,
        description="Linear only, with a spec-level calibration: decompose W·L (L = L_1 ⊗ … "
        "⊗ L_d, Cholesky factors of a Kronecker-factored approximation of the layer's input "
        "second moment over its input modes) and map the input factors back, which targets "
        "the layer's output error on the data instead of its weight error; "
        "energy/max_error then refer to that whitened (output) error, exact when the second "
        "moment is Kronecker-structured. false: plain HOSVD/HOOI of the weight.",
    )

    @field_validator("ranks", mode="before")
    @classmethod
    def _no_bools(cls, v):
        if isinstance(v, list) and any(isinstance(x, bool) for x in v):
            raise ValueError("Tucker ranks are ints >= 1 or fractions in (0, 1], not booleans")
        return v

    @model_validator(mode="after")
    def _consistent_modes(self) -> TuckerParams:
        d = self.mode_count()
        if self.ranks is not None and len(self.ranks) not in (2, 2 * d):
            raise ValueError(
                f"ranks needs 2 values [r_out, r_in] (or 2d = {2 * d} for a Linear), "
                f"got {len(self.ranks)}"
            )
        return self


def tucker_param_count(
    shape: Sequence[int], ranks: Sequence[int], decomposed: Sequence[bool]
) -> int:
    """Parameters of a Tucker decomposition: the core, and a factor per decomposed mode."""
    factors = sum(n * r for n, r, dec in zip(shape, ranks, decomposed, strict=True) if dec)
    return math.prod(ranks) + factors


def _max_ranks(shape: Sequence[int]) -> list[int]:
    return [min(n, math.prod(shape) // n) for n in shape]


def _scaled(fraction: float, max_rank: int) -> int:
    return max(1, min(max_rank, math.floor(fraction * max_rank + 0.5)))  # halves round up


def _requested_ranks(
    params: TuckerParams,
    shape: Sequence[int],
    decomposed: Sequence[bool],
    side: Sequence[int],
    budget: float,
) -> list[int | None] | None:
    """Ranks per mode (``None`` for kept modes) from the params; ``None`` altogether
    when they come from the spectra (``energy``/``max_error``). ``side[k]`` is 0 for an
    output mode, 1 for an input mode (which entry of a two-value ``ranks`` it takes)."""
    top = _max_ranks(shape)
    idx = [k for k, dec in enumerate(decomposed) if dec]

    def fill(values: dict[int, int]) -> list[int | None]:
        return [values.get(k) for k in range(len(shape))]

    if params.ranks is not None:
        vals = params.ranks
        pick = (lambda i, k: vals[side[k]]) if len(vals) == 2 else (lambda i, k: vals[i])
        out = {}
        for i, k in enumerate(idx):
            v = pick(i, k)
            out[k] = v if isinstance(v, int) else _scaled(v, top[k])
        return fill(out)
    if params.rank is not None:
        return fill({k: params.rank for k in idx})
    if params.rank_ratio is not None:
        return fill({k: _scaled(params.rank_ratio, top[k]) for k in idx})
    if params.param_ratio is None:
        return None

    def at(f: float) -> list[int]:
        r = fill({k: max(1, math.floor(f * top[k] + 1e-9)) for k in idx})
        return feasible_ranks(shape, r)

    # ranks(f) grow with f: binary search the largest candidate fraction within budget
    cands = sorted({r / top[k] for k in idx for r in range(1, top[k] + 1)})
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tucker_param_count(shape, at(cands[mid]), decomposed) <= budget:
            lo = mid
        else:
            hi = mid - 1
    r = at(cands[lo])
    return fill({k: r[k] for k in idx})


@dataclass
class _Target:
    """The tensor to decompose, which of its modes get a factor, and each mode's side
    (0: output, 1: input; which entry of a two-value ``ranks`` applies)."""

    tensor: torch.Tensor
    decomposed: list[bool]
    side: list[int]
    resolved: dict


def _target(module: nn.Module, params: TuckerParams) -> _Target | str:
    """What to decompose, or the reason not to."""
    w = module.weight.detach()
    a = w.to(compute_dtype(w))
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}: only groups=1 convolutions are decomposed"
        if params.ranks is not None and len(params.ranks) != 2:
            return "a Conv2d takes ranks [r_out, r_in] (2 values)"
        return _Target(a, [True, True, False, False], [0, 1, 0, 0], {})
    try:
        in_f, out_f = linear_modes(
            module.in_features, module.out_features, params.d, params.in_factors, params.out_factors
        )
    except ValueError as exc:
        return str(exc)
    d = len(in_f)
    padded = (math.prod(out_f), math.prod(in_f))
    t = torch.zeros(padded, dtype=a.dtype, device=a.device)
    t[: a.shape[0], : a.shape[1]] = a
    resolved: dict = {"in_factors": list(in_f), "out_factors": list(out_f)}
    if padded != (module.out_features, module.in_features):
        resolved["padded"] = list(padded)
    return _Target(t.reshape(*out_f, *in_f), [True] * (2 * d), [0] * d + [1] * d, resolved)


def _layer(module: nn.Module, dec: Tucker, params: TuckerParams) -> TuckerConv2d | TuckerLinear:
    """The replacement holding ``dec``, in the module's dtype."""
    dtype = module.weight.dtype
    core = dec.core.to(dtype=dtype)
    us = [f.to(dtype=dtype) for f in dec.factors if f is not None]
    if isinstance(module, nn.Conv2d):
        return TuckerConv2d.from_tucker(module, core, us[0], us[1])
    d = len(us) // 2
    bias = module.bias.detach() if module.bias is not None else None
    return TuckerLinear.from_tucker(
        core, us[:d], us[d:], module.in_features, module.out_features, bias, params.path
    )


def plan(module: nn.Module, params: TuckerParams, ctx: Context) -> Decision:
    """Resolve the ranks, decompose (HOSVD + HOOI), build the layer and measure its error
    (a Linear with calibration statistics and ``whiten``: the whitened weight is
    decomposed, and the exact output error on the data is measured too)."""
    target = _target(module, params)
    if isinstance(target, str):
        return Decision(skip_reason=target)
    t, decomposed = target.tensor, target.decomposed
    resolved = {**params.describe(), **target.resolved}
    shape = list(t.shape)
    dense = module.weight.numel()
    bias = module.bias.numel() if module.bias is not None else 0
    budget = (params.param_ratio or 0.0) * (dense + bias) - bias
    requested = _requested_ranks(params, shape, decomposed, target.side, budget)
    rel_error = None
    if requested is None:  # energy / max_error: the ranks come from the spectra
        rel_error = params.max_error
        if rel_error is None:
            rel_error = math.sqrt(max(0.0, 1.0 - params.energy))

    def shown(r: Sequence[int]) -> list[int]:
        return [x for x, dec in zip(r, decomposed, strict=True) if dec]

    def too_big(r: Sequence[int]) -> Decision | None:
        kept = tucker_param_count(shape, r, decomposed)
        if kept < dense:
            return None
        return Decision(
            resolved={**resolved, "ranks": shown(r)},
            skip_reason=f"would not shrink: Tucker ranks {shown(r)} need {kept} weight params, "
            f"dense has {dense}",
        )

    # known ranks: refuse before decomposing anything
    if requested is not None and (skip := too_big(feasible_ranks(shape, requested))):
        return skip
    caps = requested or [n if dec else None for n, dec in zip(shape, decomposed, strict=True)]
    white, in_f = None, target.resolved.get("in_factors")
    if isinstance(module, nn.Linear):
        white = input_whitening(module, ctx, params.whiten, in_f)
    if white is not None:  # W ×_{n_k} L_kᵀ: every truncation acts on the output
        t = white.whiten(t.double(), len(in_f))
        resolved["whitened"] = True
    init = hosvd(t, caps, rel_error)
    if skip := too_big(init.ranks):
        return skip
    dec, _ = hooi(t, init, params.hooi_iters)
    if white is not None:  # back to factors of W: L_k⁻ᵀ U_k on each input mode
        d = len(in_f)
        factors = list(dec.factors)
        for k in range(d):
            factors[d + k] = white.unwhiten(factors[d + k], k, axis=0)
        dec = Tucker(dec.core, factors, dec.spectra)
    resolved.update(ranks=shown(dec.ranks), hooi_iters=params.hooi_iters)
    layer = _layer(module, dec, params)
    if isinstance(module, nn.Linear):
        rows = math.prod((ctx.input_shape or (1, module.in_features))[:-1])
        flops = layer.flops((rows, module.in_features))
    else:
        flops = layer.flops(ctx.input_shape) if ctx.input_shape is not None else None
    with torch.no_grad():  # the error surgery will measure: same layer, same arithmetic
        approx = layer.to_dense()
        err = relative_error(approx, module.weight)
        out_err = white.output_error(approx, module.weight) if white is not None else None
    return Decision(
        resolved=resolved,
        params_after=layer.weight_params() + bias,
        flops_after=flops,
        predicted_error=err,
        predicted_output_error=out_err,
        state=layer,
    )


build = build_from_plan("tucker", plan)


@hookimpl
def register_transforms(register):
    """Register ``tucker``."""
    register(
        Transform(
            name="tucker",
            params_model=TuckerParams,
            module_types=(nn.Linear, nn.Conv2d),
            build=build,
            plan=plan,
            layers=(TuckerConv2d, TuckerLinear),
            description="Tucker by HOSVD + HOOI (Conv2d: Tucker-2, 1x1 -> kxk core -> 1x1; "
            "Linear: tensorized weight, forward contracts through the factors).",
        )
    )
