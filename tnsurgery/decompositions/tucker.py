"""Tucker decomposition: HOSVD, HOOI, and the tensor they represent.

A tensor ``T (n_1, ..., n_N)`` is written as a core ``G (r_1, ..., r_N)`` and
factor matrices ``U_k (n_k, r_k)`` with orthonormal columns:

    T ≈ G ×_1 U_1 ×_2 U_2 ⋯ ×_N U_N.

A mode may be left out (its factor ``None``): it is kept at full size, as the
spatial modes of a Tucker-2 convolution kernel are. :func:`hosvd` is the
truncated higher-order SVD (De Lathauwer, De Moor & Vandewalle 2000a), whose
squared error is at most the sum over modes of the squared singular values
dropped from each unfolding; :func:`hooi` refines it by higher-order
orthogonal iteration (De Lathauwer et al. 2000b), which never makes it worse.
With orthonormal factors, ``‖T - T̂‖² = ‖T‖² - ‖G‖²``, so a larger core is a
better approximation: that is what HOOI increases, and how it is checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tnsurgery.decompositions.svd import left_singular, rank_for_tail

Factors = list[torch.Tensor | None]


@dataclass
class Tucker:
    """A Tucker decomposition: ``core`` and one factor per mode (``None``: mode kept).

    ``spectra[k]`` holds all singular values of the mode-k unfolding of the
    original tensor (``None`` for kept modes, or when not computed).
    """

    core: torch.Tensor
    factors: Factors
    spectra: list[torch.Tensor | None]

    @property
    def ranks(self) -> list[int]:
        """The core's shape: the multilinear rank of the decomposed modes."""
        return list(self.core.shape)


def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding: the matrix ``(n_mode, ∏ other sizes)``."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def mode_product(t: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``t ×_mode m`` for a matrix ``m (J, n_mode)``: mode ``mode`` becomes size ``J``."""
    return torch.tensordot(t, m, dims=([mode], [1])).movedim(-1, mode)


def tucker_to_full(core: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``core ×_1 U_1 ⋯ ×_N U_N``; a ``None`` factor leaves its mode as it is."""
    t = core
    for k, u in enumerate(factors):
        if u is not None:
            t = mode_product(t, u, k)
    return t


def project(t: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The core of ``t`` for orthonormal ``factors``: ``t ×_1 U_1ᵀ ⋯ ×_N U_Nᵀ``."""
    return tucker_to_full(t, [None if u is None else u.mT for u in factors])


def feasible_ranks(shape: Sequence[int], ranks: Sequence[int | None]) -> list[int]:
    """The largest multilinear rank at most ``ranks`` that a tensor of ``shape`` can
    have: ``r_k <= n_k`` and ``r_k <= ∏_{j≠k} r_j`` (a ``None`` mode is kept whole).

    A rank above the product of the others only adds zero slices to the core,
    so it is lowered; the result is unique (the feasible ranks are closed
    under elementwise max) and never lower than needed.
    """
    r = [n if x is None else max(1, min(int(x), n)) for x, n in zip(ranks, shape, strict=True)]
    changed = True
    while changed:
        changed = False
        for k in range(len(r)):
            cap = math.prod(r[:k] + r[k + 1 :])
            if ranks[k] is not None and r[k] > cap:
                r[k], changed = cap, True
    return r


def _leading_left(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` leading left singular vectors of ``m`` and all its singular values."""
    u, s = left_singular(m)
    return u[:, :r], s


def _compress(core: torch.Tensor, factors: Factors, kept: Sequence[bool]) -> torch.Tensor:
    """Lower, without loss, each rank above the product of the others (in the order
    :func:`feasible_ranks` does): returns the new core, ``factors`` is updated in place."""
    changed = True
    while changed:
        changed = False
        r = list(core.shape)
        for k in range(len(r)):
            cap = math.prod(r[:k] + r[k + 1 :])
            if kept[k] or r[k] <= cap:
                continue
            # the unfolding has rank <= cap: its leading cap left vectors span it exactly
            q, _ = _leading_left(unfold(core, k), cap)
            core = mode_product(core, q.mT, k)
            factors[k] = factors[k] @ q
            r[k], changed = cap, True
    return core


def hosvd(
    t: torch.Tensor,
    ranks: Sequence[int | None] | None = None,
    rel_error: float | None = None,
) -> Tucker:
    """Truncated HOSVD of ``t``: each factor holds the leading left singular vectors of
    the tensor's unfolding in its mode.

    Args:
        t: the tensor (float32 or float64).
        ranks: one entry per mode: the rank to keep, or ``None`` to keep the mode
            whole (no factor). ``None`` altogether: every mode is decomposed.
        rel_error: when given, each decomposed mode keeps the fewest singular
            values whose dropped tail is at most ``rel_error·‖T‖/√N`` (N the
            number of decomposed modes), which guarantees a relative error of
            at most ``rel_error``; ``ranks`` then caps the result.

    Ranks are lowered to :func:`feasible_ranks` afterwards, without loss.
    """
    n = t.dim()
    ranks = list(ranks) if ranks is not None else [max(t.shape)] * n
    kept = [r is None for r in ranks]
    decomposed = n - sum(kept)
    delta = None
    if rel_error is not None and decomposed:
        delta = rel_error * float(t.double().norm()) / math.sqrt(decomposed)
    factors: Factors = []
    spectra: list[torch.Tensor | None] = []
    for k in range(n):
        if kept[k]:
            factors.append(None)
            spectra.append(None)
            continue
        u, s = _leading_left(unfold(t, k), t.shape[k])
        r = len(s)
        if delta is not None:
            r = rank_for_tail(s, delta, slack=1e-12)
        r = max(1, min(r, int(ranks[k])))
        factors.append(u[:, :r])
        spectra.append(s)
    core = _compress(project(t, factors), factors, kept)
    return Tucker(core, factors, spectra)


def hosvd_error_bound(spectra: Sequence[torch.Tensor | None], ranks: Sequence[int]) -> float:
    """Upper bound on the relative error of the truncated HOSVD at ``ranks``:
    ``sqrt(Σ_k Σ_{i > r_k} σ_i^(k)²) / ‖T‖`` (every spectrum has ``‖T‖²`` in total)."""
    dropped, total = 0.0, None
    for s, r in zip(spectra, ranks, strict=True):
        if s is None:
            continue
        s2 = s.double().square()
        total = float(s2.sum())
        dropped += float(s2[r:].sum())
    if not total:
        return 0.0
    return math.sqrt(dropped / total)


def core_error(t_norm_sq: float, core: torch.Tensor) -> float:
    """Relative error ``sqrt(‖T‖² - ‖G‖²) / ‖T‖`` of a Tucker approximation with
    orthonormal factors (subject to cancellation near zero: for reporting, rebuild)."""
    if t_norm_sq <= 0:
        return 0.0
    return math.sqrt(max(t_norm_sq - float(core.double().square().sum()), 0.0) / t_norm_sq)


def hooi(t: torch.Tensor, init: Tucker, iters: int) -> tuple[Tucker, int]:
    """Refine ``init`` (e.g. :func:`hosvd`) by up to ``iters`` sweeps of higher-order
    orthogonal iteration at the same ranks.

    Each sweep sets every factor, in turn, to the leading left singular vectors
    of the tensor projected on all the other factors, which can only enlarge
    ``‖G‖`` (shrink the error). Sweeps stop early once one no longer improves;
    the best decomposition seen (``init`` included) is returned, with the
    number of sweeps that improved it.
    """
    factors = list(init.factors)
    ranks = init.ranks
    best, best_sq, improved = init, float(init.core.double().square().sum()), 0
    for _ in range(iters):
        for k, u in enumerate(factors):
            if u is None:
                continue
            others = [None if j == k else f for j, f in enumerate(factors)]
            y = project(t, others)
            factors[k], _ = _leading_left(unfold(y, k), ranks[k])
        core = project(t, factors)
        sq = float(core.double().square().sum())
        if not sq > best_sq:
            break
        best, best_sq = Tucker(core, list(factors), init.spectra), sq
        improved += 1
    return best, improved
