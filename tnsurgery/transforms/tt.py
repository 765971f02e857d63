"""``tt``: Tensor-Train (TT-matrix) factorization of ``nn.Linear`` (and of Hugging Face's
``Conv1D``, GPT-2's Linear with its weight stored transposed: as the Linear it computes).

The weight ``W (out, in)`` is reshaped to a d-way tensor whose k-th mode
pairs the k-th output and input factors, and decomposed by TT-SVD
(Oseledets 2011), the quasi-optimal TT approximation at the chosen ranks.
Sizes that do not factor into balanced modes (e.g. primes) are zero-padded
to the nearest size that does (at most +25%), or refused with the reason.
``nn.Conv2d`` is not accepted: use ``factorize`` for convolutions (a TT conv
would need a channel-mode reshaping that is rarely worth it at k×k kernels).

Data-aware (``whiten``, with a spec-level calibration): the layer's output on
the data, ``‖(W − Ŵ) X‖``, is what is kept instead of its weight. The input
second moment ``C`` (damped, zero-padded positions given the mean input
energy) is approximated by a Kronecker product ``C_1 ⊗ … ⊗ C_d`` over the
input modes (partial traces, exact when ``C`` is Kronecker-structured), each
``C_k = L_k L_kᵀ``; TT-SVD then runs on ``W ×_k L_kᵀ`` (every input mode
whitened) and each core's input index is mapped back by ``L_k⁻ᵀ``, so the
layer keeps its shapes, ranks and parameter count. ``energy``/``max_error``
then bound ``‖(W − Ŵ) L‖ / ‖W L‖`` with the Kronecker ``L = ⊗ L_k``: the output
error exactly when ``C`` is Kronecker, an approximation of it otherwise. The
plan's ``predicted_output_error`` is always measured against the exact ``C``:
``sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from tnsurgery.decompositions.conv1d import Conv1D, linear_features, linear_weight
from tnsurgery.decompositions.factors import linear_modes
from tnsurgery.decompositions.svd import compute_dtype
from tnsurgery.decompositions.tt import matrix_to_tt_tensor, split_cores, tt_svd
from tnsurgery.decompositions.whitening import input_whitening
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.tt import TTLinear
from tnsurgery.transform import (
    RANK_OPTIONS,
    Context,
    Decision,
    ModeOptions,
    Transform,
    build_from_plan,
    relative_error,
)


class TTParams(ModeOptions):
    """Params of ``tt``: TT ranks (``ranks``, or one shared rank option), the modes.

    - ``ranks``: an int (every bond) or a list of d-1 ints; ``rank`` is the
      same as an int ``ranks``; ``rank_ratio`` is a fraction of each bond's
      largest possible rank; ``param_ratio`` picks the largest uniform rank
      cap that keeps that fraction of the layer's parameters; ``energy`` and
      ``max_error`` set the TT-SVD truncation (relative Frobenius error
      ``max_error``, or ``sqrt(1 - energy)``), split over the d-1 bonds;
      whitened, of ``W·L`` instead of ``W``.
    - ``whiten``: with calibration statistics of the layer's inputs, TT-SVD
      of the whitened weight ``W·L``, ``L = L_1 ⊗ … ⊗ L_d`` from a Kronecker
      factoring of the input second moment over the input modes, mapped back
      by ``L_k⁻ᵀ`` on each core: the layer's output on the data is what is
      kept. Ignored without calibration statistics.
    """

    rank_fields = (*RANK_OPTIONS, "ranks")

    ranks: int | list[int] | None = Field(
        None, description="TT ranks: one int for every bond, or a list of d-1 ints."
    )
    d: int = Field(
        3, ge=2, le=8, description="Number of TT cores (modes) when factors are not given."
    )

    whiten: bool = Field(
        True,
        description="With a spec-level calibration: decompose W·L (L = L_1 ⊗ … ⊗ L_d, "
        "Cholesky factors of a Kronecker-factored approximation of the layer's input second "
        "moment over its input modes) and map each core back, which targets the layer's "
        "output error on the data instead of its weight error; energy/max_error then refer "
        "to that whitened (output) error, exact when the second moment is Kronecker-structured. "
        "false: plain TT-SVD of the weight.",
    )

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, v):
        vals = [v] if isinstance(v, int) else (v or [])
        if any(isinstance(x, bool) or x < 1 for x in vals):
            raise ValueError("TT ranks must be integers >= 1")
        return v

    @model_validator(mode="after")
    def _consistent_modes(self) -> TTParams:
        d = self.mode_count()
        if isinstance(self.ranks, list) and len(self.ranks) != d - 1:
            raise ValueError(f"ranks needs d-1 = {d - 1} values, got {len(self.ranks)}")
        return self


def _max_bond_ranks(in_f, out_f) -> list[int]:
    sizes = [m * n for m, n in zip(out_f, in_f, strict=True)]
    return [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    ]


def tt_param_count(in_f, out_f, ranks: list[int]) -> int:
    """Parameters of TT-matrix cores with bond ranks ``ranks`` (d-1 values)."""
    r = [1, *ranks, 1]
    return sum(r[k] * out_f[k] * in_f[k] * r[k + 1] for k in range(len(in_f)))


def _caps(module, params: TTParams, in_f, out_f) -> tuple[list[int] | None, float | None]:
    """Rank caps and TT-SVD relative error from the params."""
    bond_max = _max_bond_ranks(in_f, out_f)
    d = len(in_f)
    if params.ranks is not None or params.rank is not None:
        r = params.ranks if params.ranks is not None else params.rank
        caps = [r] * (d - 1) if isinstance(r, int) else list(r)
        return [min(c, b) for c, b in zip(caps, bond_max, strict=True)], None
    if params.rank_ratio is not None:
        return [max(1, math.floor(params.rank_ratio * b + 0.5)) for b in bond_max], None
    if params.energy is not None:
        return None, math.sqrt(max(0.0, 1.0 - params.energy))
    if params.max_error is not None:
        return None, params.max_error
    # param_ratio: the largest uniform cap whose cores fit the budget
    bias = module.bias.numel() if module.bias is not None else 0
    fin, fout = linear_features(module)
    budget = params.param_ratio * (fin * fout + bias) - bias
    lo, hi = 1, max(bond_max)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_param_count(in_f, out_f, [min(mid, b) for b in bond_max]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return [min(lo, b) for b in bond_max], None


def plan(module: nn.Module, params: TTParams, ctx: Context) -> Decision:
    """TT-SVD the weight at the requested ranks and measure the exact error (with
    calibration statistics and ``whiten``: of the whitened weight, and the exact
    output error on the data too)."""
    fin, fout = linear_features(module)  # a Conv1D: the Linear it computes
    try:
        in_f, out_f = linear_modes(fin, fout, params.d, params.in_factors, params.out_factors)
    except ValueError as exc:
        return Decision(skip_reason=str(exc))
    caps, rel_error = _caps(module, params, in_f, out_f)
    white = input_whitening(module, ctx, params.whiten, in_f)
    w = linear_weight(module).detach()  # (out, in)
    a = w.to(compute_dtype(w) if white is None else torch.float64)
    rows_p, cols_p = math.prod(out_f), math.prod(in_f)
    padded = torch.zeros(rows_p, cols_p, dtype=a.dtype, device=a.device)
    padded[: a.shape[0], : a.shape[1]] = a
    if white is not None:  # W·(L_1 ⊗ … ⊗ L_d): every truncation acts on the output
        padded = white.whiten(padded.reshape(rows_p, *in_f), 1).reshape(rows_p, cols_p)
    cores3, _ = tt_svd(matrix_to_tt_tensor(padded, out_f, in_f), caps, rel_error)
    cores = split_cores(cores3, out_f, in_f)
    if white is not None:  # back to cores of W: L_k⁻ᵀ on each core's input index
        cores = [white.unwhiten(c, k, axis=2) for k, c in enumerate(cores)]
    ranks = [c.shape[-1] for c in cores[:-1]]
    kept = sum(c.numel() for c in cores)
    bias = module.bias.numel() if module.bias is not None else 0
    resolved = {
        **params.describe(),
        "ranks": ranks,
        "in_factors": list(in_f),
        "out_factors": list(out_f),
    }
    if math.prod(in_f) != fin or math.prod(out_f) != fout:
        resolved["padded"] = [math.prod(out_f), math.prod(in_f)]
    if white is not None:
        resolved["whitened"] = True
    if kept >= fin * fout:
        return Decision(
            resolved=resolved,
            skip_reason=(
                f"would not shrink: TT ranks {ranks} need {kept} weight params, dense has "
                f"{fin * fout}"
            ),
        )
    layer = TTLinear.from_cores(
        [c.to(dtype=w.dtype) for c in cores],
        fin,
        fout,
        module.bias.detach() if module.bias is not None else None,
        params.path,
    )
    with torch.no_grad():
        dense = layer.to_dense()
    err = relative_error(dense, w)  # measured as surgery measures weight_error
    out_err = white.output_error(dense, w) if white is not None else None
    rows = math.prod((ctx.input_shape or (1, fin))[:-1])
    return Decision(
        resolved=resolved,
        params_after=kept + bias,
        flops_after=layer.flops((rows, fin)),
        predicted_error=err,
        predicted_output_error=out_err,
        state=layer,
    )


build = build_from_plan("tt", plan)


@hookimpl
def register_transforms(register):
    """Register ``tt``."""
    register(
        Transform(
            name="tt",
            params_model=TTParams,
            module_types=(nn.Linear, Conv1D),
            build=build,
            plan=plan,
            layers=(TTLinear,),
            description="Tensor-Train (TT-matrix) Linear (or HF Conv1D) by TT-SVD; forward "
            "contracts through the cores or rebuilds the weight, whichever costs fewer FLOPs.",
        )
    )
