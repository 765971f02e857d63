"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares.

A d-way tensor ``T (I_1, ..., I_d)`` is approximated by ``R`` rank-one terms,

    T ≈ Σ_r λ_r · a¹_r ∘ a²_r ∘ ⋯ ∘ aᵈ_r,

held as a weight vector ``λ (R,)`` and factor matrices ``A_k (I_k, R)`` with
unit-norm columns. :func:`cp_als` is the classic ALS (Carroll & Chang 1970;
Kolda & Bader 2009, fig. 3.3): started from the leading left singular vectors
of each unfolding (HOSVD), each sweep solves exactly for one factor with the
others fixed. It needs no tensorly: the tensors here are conv kernels, small
enough that every sweep also rebuilds ``T̂`` to measure the error exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tnsurgery.decompositions.svd import left_singular

# Tikhonov term added to each normal-equation matrix, relative to its mean diagonal:
# large enough to keep a (near-)collinear Gram matrix invertible, small enough not to
# move an exact solution at float64 precision.
RIDGE = 1e-12
# Below this relative error, the error of a sweep is measured on the rebuilt tensor.
EXACT_BELOW = 1e-4


@dataclass
class CPResult:
    """The outcome of :func:`cp_als`.

    Attributes:
        weights: ``λ (R,)``, non-negative, the norms of the rank-one terms.
        factors: ``A_k (I_k, R)`` per mode, columns of unit norm (zero columns
            stay zero, with ``λ_r = 0``).
        fit: ``1 - ‖T - T̂‖ / ‖T‖``, measured on the rebuilt tensor (1 for a
            zero tensor, which is represented exactly).
        iterations: ALS sweeps run.
        converged: whether the fit changed by less than ``tol`` in the last sweep
            (``False`` when ``max_iter`` stopped it).
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    fit: float
    iterations: int
    converged: bool

    @property
    def error(self) -> float:
        """Relative Frobenius error ``‖T - T̂‖ / ‖T‖``."""
        return 1.0 - self.fit


def khatri_rao(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product: row ``(i_1, ..., i_k)`` (first index slowest) of
    column ``r`` is ``∏_j mats[j][i_j, r]``; matches a C-order reshape of those modes."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])
    return out


def cp_to_full(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``Σ_r λ_r a¹_r ∘ ⋯ ∘ aᵈ_r`` of a CP decomposition."""
    shape = [f.shape[0] for f in factors]
    rest = khatri_rao(list(factors[1:])) if len(factors) > 1 else None
    first = factors[0] * weights
    full = first @ rest.mT if rest is not None else first.sum(1)
    return full.reshape(shape)


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding ``(I_mode, ∏ other I)``, other modes in their order."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _hosvd_init(t: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Leading ``rank`` left singular vectors of each unfolding; a mode with fewer than
    ``rank`` rows gets its missing columns from a seeded normal draw."""
    factors = []
    for mode, size in enumerate(t.shape):
        u, _ = left_singular(_unfold(t, mode))
        u = u[:, :rank]
        if u.shape[1] < rank:
            # drawn on the CPU so that a seed gives the same start on every device
            extra = torch.randn(size, rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(device=t.device, dtype=t.dtype)], dim=1)
        factors.append(u)
    return factors


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
) -> CPResult:
    """Rank-``rank`` CP decomposition of ``tensor`` by ALS, in float64.

    Args:
        tensor: the d-way tensor (d ≥ 2), on any device; computed in float64.
        rank: number of rank-one terms ``R`` (may exceed every dimension).
        max_iter: most ALS sweeps (one sweep updates every factor once).
        tol: stop when the fit changes by less than this in one sweep.
        seed: seeds the columns that the HOSVD start cannot fill (modes shorter
            than ``rank``); the result is deterministic for a seed and device.

    Returns:
        A :class:`CPResult` whose ``fit`` is measured exactly on the rebuilt tensor.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if tensor.dim() < 2:
        raise ValueError("CP needs a tensor of at least 2 modes")
    original = tensor.detach().to(torch.float64)
    t = original
    norm = float(t.norm())
    if norm == 0.0 or not math.isfinite(norm):
        zeros = [t.new_zeros(s, rank) for s in t.shape]
        fit = 1.0 if norm == 0.0 else math.nan
        return CPResult(t.new_zeros(rank), zeros, fit, 0, norm == 0.0)
    # The largest mode goes first: each sweep contracts it away once, and every other
    # mode's MTTKRP then works on the (numel / I_0)·R partial product.
    d = t.dim()
    order = sorted(range(d), key=lambda m: -t.shape[m])
    t = t.permute(order)
    gen = torch.Generator().manual_seed(seed)
    factors = _hosvd_init(t, rank, gen)
    unfolded = t.reshape(t.shape[0], -1)
    letters = "abcdefghijklmnopqrstuvwxy"[:d]
    eye = torch.eye(rank, dtype=t.dtype, device=t.device)
    weights = t.new_ones(rank)
    fit, converged, sweeps = -math.inf, False, 0
    while sweeps < max_iter:
        sweeps += 1
        grams = [f.mT @ f for f in factors]
        for mode in range(d):
            if mode == 0:
                mttkrp = unfolded @ khatri_rao(factors[1:])
            else:
                if mode == 1:  # T ×₀ A₀, shared by the MTTKRPs of modes 1..d-1
                    partial = torch.einsum(f"{letters},az->{letters[1:]}z", t, factors[0])
                others = [m for m in range(1, d) if m != mode]
                subs = ",".join(f"{letters[m]}z" for m in others)
                eq = f"{letters[1:]}z,{subs}->{letters[mode]}z" if others else None
                mttkrp = torch.einsum(eq, partial, *(factors[m] for m in others)) if eq else partial
            factors[mode], weights = _solve_mode(mttkrp, grams, mode, eye)
            grams[mode] = factors[mode].mT @ factors[mode]
        new_fit = 1.0 - _error(t, norm, weights, factors, grams, mttkrp)
        if not math.isfinite(new_fit):
            break
        if abs(new_fit - fit) < tol:
            converged = True
            break
        fit = new_fit
    inverse = [order.index(m) for m in range(d)]
    factors = [factors[i] for i in inverse]
    full = cp_to_full(weights, factors)
    fit = 1.0 - float((full - original).norm()) / norm
    return CPResult(weights, factors, fit, sweeps, converged and math.isfinite(fit))


def _error(
    t: torch.Tensor,
    norm: float,
    weights: torch.Tensor,
    factors: list[torch.Tensor],
    grams: list[torch.Tensor],
    mttkrp: torch.Tensor,
) -> float:
    """Relative error of the current decomposition of ``t``, given the grams of the
    factors and the MTTKRP that produced the last factor."""
    # ‖T - T̂‖² = ‖T‖² - 2<T, T̂> + ‖T̂‖², from the last mode's MTTKRP: cheap, but the
    # cancellation blurs errors below ~1e-8, so near an exact fit T̂ is rebuilt instead
    inner = float((mttkrp * factors[-1] * weights).sum())
    gram = grams[0]
    for g in grams[1:]:
        gram = gram * g
    approx_sq = float(weights @ gram @ weights)
    err = math.sqrt(max(norm * norm - 2 * inner + approx_sq, 0.0)) / norm
    if err < EXACT_BELOW:
        err = float((cp_to_full(weights, factors) - t).norm()) / norm
    return err


def _solve_mode(
    mttkrp: torch.Tensor, grams: list[torch.Tensor], mode: int, eye: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares factor of ``mode`` given the others: ``M (∘_{m≠mode} AₘᵀAₘ)⁻¹``,
    split into unit-norm columns and their norms."""
    gram = None
    for m, g in enumerate(grams):
        if m != mode:
            gram = g.clone() if gram is None else gram * g
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-300
    new = torch.linalg.solve(gram + ridge * eye, mttkrp.mT).mT
    weights = new.norm(dim=0)
    safe = torch.where(weights > 0, weights, torch.ones_like(weights))
    return new / safe, weights
