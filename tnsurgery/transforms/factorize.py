"""``factorize``: truncated-SVD low-rank factorization of ``nn.Linear``, ``nn.Conv2d`` and
Hugging Face's ``Conv1D`` (GPT-2).

A Linear's weight ``W (out, in)`` becomes ``U (out, r)`` and ``V (r, in)`` with
``U V`` the best rank-``r`` approximation of ``W`` (Eckart–Young); the
singular values are split evenly (``U = U_r √S``, ``V = √S V_rᵀ``) so both
factors train at the same scale. A Conv2d's kernel is seen as the matrix
``(out, in·kh·kw)``: ``V`` becomes a k×k conv into ``r`` channels, ``U`` a 1×1
conv to the output channels. A ``Conv1D`` (weight stored ``(in, out)``) is factorized
as the Linear of weight ``Wᵀ`` it computes, into a ``LowRankLinear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tnsurgery.decompositions.conv1d import Conv1D, linear_weight
from tnsurgery.decompositions.svd import (
    compute_dtype,
    exact_svd,
    gram_eigh,
    gram_svd,
    randomized_svd,
)
from tnsurgery.decompositions.whitening import cholesky_jittered
from tnsurgery.flops import conv2d_output_hw
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.lowrank import LowRankConv2d, LowRankLinear
from tnsurgery.transform import (
    Context,
    Decision,
    RankOptions,
    Transform,
    relative_error,
    resolve_rank,
)


# 'auto' uses the randomized SVD when its sketch, times its passes over the weight
# (niter + 1), is at most the full rank: then it costs less than the Gram product of
# the 'gram' method, which is otherwise the fastest (and exact) choice here: see
# docs/benchmarks.md, where it reaches the optimal error in a third to a half of
# LAPACK's SVD time on BERT-sized layers.
def _randomized_pays(q: int, niter: int, full_rank: int) -> bool:
    return q * (niter + 1) <= full_rank


class FactorizeParams(RankOptions):
    """Params of ``factorize``: one rank option, plus how to compute the SVD."""

    method: Literal["auto", "exact", "gram", "randomized"] = Field(
        "auto",
        description="SVD algorithm: 'randomized' (Halko et al., as torch.svd_lowrank) when "
        "the rank is small against the matrix; 'gram' (eigendecomposition of the smaller "
        "Gram matrix: exact truncation, faster than LAPACK's SVD) otherwise; 'exact' is "
        "LAPACK's SVD. 'auto' chooses between randomized and gram; energy and max_error "
        "need the whole spectrum, so they never use randomized.",
    )
    niter: int = Field(4, ge=0, le=20, description="Power iterations of the randomized SVD.")
    oversample: int = Field(16, ge=0, description="Extra columns sketched by the randomized SVD.")
    seed: int = Field(0, description="Seed of the randomized SVD (results are deterministic).")
    rank_multiple: int | None = Field(
        None,
        gt=0,
        le=1024,
        strict=True,
        description="Round the rank to the nearest multiple of this (ties up; at least one "
        "multiple, at most min(out, in)): GEMM kernels run thin factors at 8/16/32/64-aligned "
        "ranks much faster than at odd ones ('tnsurgery bench' times both). The plan's "
        "resolved settings show the rank asked (rank_asked) and the rank used (rank).",
    )
    whiten: bool = Field(
        True,
        description="With a spec-level calibration: factorize W·L (L Lᵀ the layer's input "
        "second moment) and map back, which minimizes the layer's output error on the data "
        "instead of its weight error (SVD-LLM); energy/max_error then refer to the output. "
        "false: plain SVD of the weight.",
    )


@dataclass
class _Svd:
    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    v: torch.Tensor  # (n, k)
    method: str
    whitening: torch.Tensor | None = None  # L: the SVD is of W·L


def align_rank(rank: int, multiple: int | None, full_rank: int) -> int:
    """``rank`` rounded to the nearest multiple of ``multiple`` (halves up), at least one
    multiple, at most ``full_rank``; ``rank`` itself when ``multiple`` is ``None``."""
    if multiple is None:
        return rank
    aligned = multiple * max(1, math.floor(rank / multiple + 0.5))
    return min(aligned, full_rank)


def whitening_factor(ctx: Context, params: FactorizeParams, in_dim: int) -> torch.Tensor | None:
    """``L`` (lower triangular, float64) with ``L Lᵀ`` the target's damped input second
    moment, when calibration statistics exist and ``whiten`` is on."""
    stats = ctx.input_stats
    if not params.whiten or stats is None or stats.gram.shape[0] != in_dim:
        return None
    # damping 0 on rank-deficient data: the least jitter that works
    return cholesky_jittered(stats.second_moment(1e-2 if ctx.damping is None else ctx.damping))


def _unwhiten(v: torch.Tensor, chol: torch.Tensor | None) -> torch.Tensor:
    """``V`` (n, r) of an SVD of ``W·L`` -> the factor for ``W``: ``L⁻ᵀ V``."""
    if chol is None:
        return v
    return torch.linalg.solve_triangular(chol.mT.to(v.dtype).to(v.device), v, upper=True)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as the matrix ``(out, in·…)`` that gets factorized (a
    Conv1D's: ``weight.T``, the Linear it computes)."""
    w = linear_weight(module).detach()
    return w.reshape(w.shape[0], -1)


def _choose_method(params: FactorizeParams, rank: int | None, full_rank: int) -> str:
    if rank is None and params.method == "randomized":
        return "gram"  # the rank depends on the whole spectrum
    if params.method != "auto":
        return params.method
    if rank is None:
        return "gram"
    q = rank + params.oversample
    return "randomized" if _randomized_pays(q, params.niter, full_rank) else "gram"


def spectrum(w: torch.Tensor, params: FactorizeParams):
    """All squared singular values of ``w`` (for energy/max_error), and the work to reuse."""
    a = w.to(compute_dtype(w))
    method = _choose_method(params, None, min(a.shape))
    if method == "gram":
        eig = gram_eigh(a)
        return eig[0], ("gram", eig)
    u, s, v = exact_svd(a)
    return s.square(), ("exact", _Svd(u, s, v, "exact"))


def svd(w: torch.Tensor, rank: int, params: FactorizeParams, reuse=None) -> _Svd:
    """Rank-``rank`` truncated SVD of ``w`` with the method ``params`` asks for."""
    a = w.to(compute_dtype(w))
    if reuse is not None and reuse[0] == "exact":
        return reuse[1]
    if reuse is not None and reuse[0] == "gram":
        return _Svd(*gram_svd(a, rank, reuse[1]), "gram")
    method = _choose_method(params, rank, min(a.shape))
    if method == "randomized":
        q = min(rank + params.oversample, min(a.shape))
        return _Svd(*randomized_svd(a, q, params.niter, params.seed), "randomized")
    if method == "gram":
        return _Svd(*gram_svd(a, rank), "gram")
    return _Svd(*exact_svd(a), "exact")


def plan(module: nn.Module, params: FactorizeParams, ctx: Context) -> Decision:
    """Resolve the rank, predict the error and the sizes, without building anything."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return Decision(
            skip_reason=f"groups={module.groups}: only groups=1 convolutions are factorized"
        )
    w = weight_matrix(module)
    m, n = w.shape
    white = whitening_factor(ctx, params, n)
    if white is not None:  # every truncation below acts on W·L: the output on the data
        white = white.to(w.device)
        w = w.double() @ white
    full = min(m, n)
    dense = m * n
    per_rank = m + n
    bias = module.bias.numel() if module.bias is not None else 0
    reuse = None
    cache = ctx.cache  # shared by calls at several ranks
    if cache is not None and "spectrum" not in cache:
        cache["spectrum"] = spectrum(w, params)
    if params.needs_spectrum or cache is not None:
        s2, reuse = cache["spectrum"] if cache is not None else spectrum(w, params)
        rank = resolve_rank(params, full, per_rank, dense, s2, fixed_params=bias)
    else:
        rank = resolve_rank(params, full, per_rank, dense, fixed_params=bias)
    resolved = {**params.describe(), "rank": rank}
    rounded = ""
    if params.rank_multiple is not None:
        asked, rank = rank, align_rank(rank, params.rank_multiple, full)
        resolved = {**params.describe(), "rank_multiple": params.rank_multiple}
        resolved.update(rank_asked=asked, rank=rank)
        rounded = f" (rank {asked} rounded by rank_multiple {params.rank_multiple})"
    if rank * per_rank >= dense:
        return Decision(
            resolved=resolved,
            skip_reason=(
                f"would not shrink: rank {rank}{rounded} needs {rank * per_rank} weight "
                f"params, dense has {dense}"
            ),
        )
    dec = svd(w, rank, params, reuse)
    # the error of the rank-r factors themselves: exactly what surgery measures after
    a = w.to(compute_dtype(w))
    approx = (dec.u[:, :rank] * dec.s[:rank]) @ dec.v[:, :rank].mT
    resolved["method"] = dec.method
    out_err = None
    if white is not None:
        out_err = relative_error(approx, a)  # ‖(W − Ŵ) L‖ / ‖W L‖
        dec.whitening = white
        approx = dec.u[:, :rank] * dec.s[:rank] @ _unwhiten(dec.v[:, :rank], white).mT
        a = weight_matrix(module).to(approx.dtype)
        resolved["whitened"] = True
    err = relative_error(approx, a)
    return Decision(
        resolved=resolved,
        params_after=rank * per_rank + bias,
        flops_after=_flops(module, rank, ctx.input_shape),
        predicted_error=err,
        predicted_output_error=out_err,
        state=dec,
    )


def _flops(module: nn.Module, rank: int, input_shape: tuple[int, ...] | None) -> int | None:
    if isinstance(module, (nn.Linear, Conv1D)):
        m, n = weight_matrix(module).shape
        rows = 1
        for d in (input_shape or (1, n))[:-1]:
            rows *= int(d)
        return 2 * rows * rank * (n + m)
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
    if dec is None:
        dec = svd(weight_matrix(module), rank, params)
    root = dec.s[:rank].clamp_min(0).sqrt()
    dtype, device = module.weight.dtype, module.weight.device
    u = (dec.u[:, :rank] * root).to(device=device, dtype=dtype)
    v = (_unwhiten(dec.v[:, :rank], dec.whitening) * root).mT.to(device=device, dtype=dtype)
    if isinstance(module, (nn.Linear, Conv1D)):
        bias = module.bias.detach() if module.bias is not None else None
        return LowRankLinear.from_factors(u, v, bias)
    return LowRankConv2d.from_factors(module, u, v)


def refit(new: nn.Module, old: nn.Module, stats, ctx: Context) -> float | None:
    """Sequential calibration of a ``LowRankLinear``: the rank-``r`` ``M = U V`` minimizing
    ``‖X_o Wᵀ − X_c Mᵀ‖`` (``X_o``: the original layer's inputs, ``X_c``: the inputs it
    gets in the surgered model). With ``C = X_cᵀX_c = L Lᵀ`` (damped) and
    ``P = X_cᵀX_o``, that is the rank-``r`` truncation of ``A = W Pᵀ L⁻ᵀ`` mapped back
    by ``L⁻¹`` (``‖X_c Mᵀ − X_o Wᵀ‖² = ‖M L − A‖² + const``). The new factors are kept
    only if they do better on the data than the current ones; returns the relative
    output error of the factors kept (``None``: not a LowRankLinear)."""
    if not isinstance(new, LowRankLinear) or not isinstance(old, (nn.Linear, Conv1D)):
        return None
    rows = max(stats.rows, 1)
    w = weight_matrix(old).double().cpu()
    c, p, go = stats.gram / rows, stats.cross / rows, stats.gram_original / rows
    damping = 1e-2 if ctx.damping is None else float(ctx.damping)
    scale = float(torch.diagonal(c).mean().clamp_min(1e-30))
    chol = cholesky_jittered(c + torch.eye(c.shape[0], dtype=c.dtype) * damping * scale)
    if chol is None:
        return None

    def error(m: torch.Tensor) -> float:  # exact, undamped, on the data
        ref = float(((w @ go) * w).sum())
        sq = ref - 2 * float(((w @ p.mT) * m).sum()) + float(((m @ c) * m).sum())
        return (max(sq, 0.0) / ref) ** 0.5 if ref > 0 else 0.0

    rank = new.rank
    a = w @ torch.linalg.solve_triangular(chol, p, upper=False).mT  # W Pᵀ L⁻ᵀ
    u, s_, v = gram_svd(a, rank)
    root = s_[:rank].clamp_min(0).sqrt()
    fac_u = u[:, :rank] * root
    fac_v = (_unwhiten(v[:, :rank], chol) * root).mT
    current = new.u.detach().double().cpu() @ new.v.detach().double().cpu()
    err_new, err_old = error(fac_u @ fac_v), error(current)
    if err_new >= err_old:
        return err_old
    with torch.no_grad():
        new.u.copy_(fac_u.to(new.u))
        new.v.copy_(fac_v.to(new.v))
    new.clear_dense_cache()
    return err_new


@hookimpl
def register_transforms(register):
    """Register ``factorize``."""
    register(
        Transform(
            name="factorize",
            params_model=FactorizeParams,
            module_types=(nn.Linear, nn.Conv2d, Conv1D),
            build=build,
            plan=plan,
            layers=(LowRankLinear, LowRankConv2d),
            refit=refit,
            refits=(LowRankLinear,),
            description="Truncated-SVD low-rank factorization (Linear, HF Conv1D: x·V·Uᵀ+b; "
            "Conv2d: k×k conv into r channels, then 1×1 conv).",
        )
    )
