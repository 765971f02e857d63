"""Tensor-Train (TT) decomposition of matrices (TT-matrix / MPO format).

A matrix ``W (M, N)`` with ``M = m_1⋯m_d`` and ``N = n_1⋯n_d`` is written as
cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` (``r_0 = r_d = 1``) with

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ⋯ G_d[:, i_d, j_d, :].

:func:`tt_svd` is Oseledets' TT-SVD (2011) on the tensor whose k-th mode
pairs ``(i_k, j_k)``; :func:`tt_round` is TT-rounding (orthogonalize right to
left, truncate left to right), and :func:`orthogonalize` puts cores in left-
or right-canonical form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tnsurgery.decompositions.svd import exact_svd, left_singular, rank_for_tail


def matrix_to_tt_tensor(
    w: torch.Tensor, out_factors: Sequence[int], in_factors: Sequence[int]
) -> torch.Tensor:
    """Reshape ``W (M, N)`` to the d-way tensor with modes ``m_k·n_k`` (in that order)."""
    d = len(out_factors)
    t = w.reshape(*out_factors, *in_factors)
    perm = [p for k in range(d) for p in (k, d + k)]
    return t.permute(perm).reshape([m * n for m, n in zip(out_factors, in_factors, strict=True)])


def tt_svd(
    t: torch.Tensor,
    max_ranks: Sequence[int] | None = None,
    rel_error: float | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TT-SVD of a d-way tensor. Returns the 3-way cores ``(r_{k-1}, s_k, r_k)`` and
    the singular values of each of the d-1 unfoldings that were truncated.

    Ranks are the smallest meeting ``rel_error`` (a relative Frobenius error,
    spread as ``δ = rel_error·‖T‖/√(d-1)`` per unfolding, which guarantees the
    total) and at most ``max_ranks[k]`` when given.
    """
    shape = list(t.shape)
    d = len(shape)
    delta = None
    if rel_error is not None and d > 1:
        delta = rel_error * float(t.norm()) / math.sqrt(d - 1)
    cores, spectra = [], []
    r_prev = 1
    c = t.reshape(r_prev * shape[0], -1)
    for k in range(d - 1):
        u, s = left_singular(c)
        r = len(s)
        if delta is not None:
            r = rank_for_tail(s, delta)
        if max_ranks is not None:
            r = min(r, int(max_ranks[k]))
        r = max(1, r)
        spectra.append(s)
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        c = (u[:, :r].mT @ c).reshape(r * shape[k + 1], -1)  # = S_r V_rᵀ
        r_prev = r
    cores.append(c.reshape(r_prev, shape[-1], 1))
    return cores, spectra


def tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of 3-way TT cores ``(r, s_k, r')``."""
    out = cores[0].reshape(cores[0].shape[1], -1)  # (s_1, r_1)
    for core in cores[1:]:
        r, s, r2 = core.shape
        out = (out @ core.reshape(r, s * r2)).reshape(-1, r2)
    return out.reshape([c.shape[1] for c in cores])


def split_cores(
    cores3: Sequence[torch.Tensor], out_factors: Sequence[int], in_factors: Sequence[int]
) -> list[torch.Tensor]:
    """3-way cores ``(r, m·n, r')`` -> TT-matrix cores ``(r, m, n, r')``."""
    return [
        c.reshape(c.shape[0], m, n, c.shape[2])
        for c, m, n in zip(cores3, out_factors, in_factors, strict=True)
    ]


def tt_matrix_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The matrix ``W (M, N)`` of TT-matrix cores ``(r, m, n, r')``."""
    out_f = [c.shape[1] for c in cores]
    in_f = [c.shape[2] for c in cores]
    t = tt_full([c.reshape(c.shape[0], -1, c.shape[3]) for c in cores])
    d = len(cores)
    t = t.reshape([x for m, n in zip(out_f, in_f, strict=True) for x in (m, n)])
    t = t.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return t.reshape(math.prod(out_f), math.prod(in_f))


def orthogonalize(cores: list[torch.Tensor], direction: str = "left") -> list[torch.Tensor]:
    """Canonical form by QR sweeps; the represented tensor is unchanged.

    ``"left"``: cores 1..d-1 are left-orthogonal (their ``(r·s, r')`` unfolding
    has orthonormal columns) and the norm sits in the last core; ``"right"``:
    the mirror image, the norm in the first core. Works on 3- or 4-way cores.
    """
    shapes = [c.shape for c in cores]
    c3 = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]
    d = len(c3)
    if direction == "left":
        for k in range(d - 1):
            r, s, r2 = c3[k].shape
            q, rr = torch.linalg.qr(c3[k].reshape(r * s, r2))
            c3[k] = q.reshape(r, s, q.shape[1])
            nxt = c3[k + 1]
            c3[k + 1] = (rr @ nxt.reshape(nxt.shape[0], -1)).reshape(q.shape[1], *nxt.shape[1:])
    elif direction == "right":
        for k in range(d - 1, 0, -1):
            r, s, r2 = c3[k].shape
            q, rr = torch.linalg.qr(c3[k].reshape(r, s * r2).mT)
            c3[k] = q.mT.reshape(q.shape[1], s, r2)
            prv = c3[k - 1]
            c3[k - 1] = (prv.reshape(-1, prv.shape[-1]) @ rr.mT).reshape(
                *prv.shape[:-1], q.shape[1]
            )
    else:
        raise ValueError("direction is 'left' or 'right'")
    return [c.reshape(c.shape[0], *s[1:-1], c.shape[-1]) for c, s in zip(c3, shapes, strict=True)]


def tt_round(
    cores: list[torch.Tensor],
    max_ranks: Sequence[int] | int | None = None,
    rel_error: float | None = None,
) -> list[torch.Tensor]:
    """TT-rounding: the same tensor at lower ranks (Oseledets 2011, alg. 2).

    Right-orthogonalize, then truncate each bond by an SVD from left to
    right, to ``max_ranks`` and/or a relative error. 3- or 4-way cores.
    """
    shapes = [c.shape for c in cores]
    d = len(cores)
    if isinstance(max_ranks, int):
        max_ranks = [max_ranks] * (d - 1)
    c3 = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in orthogonalize(list(cores), "right")]
    delta = None
    if rel_error is not None and d > 1:
        delta = rel_error * float(c3[0].norm()) / math.sqrt(d - 1)
    for k in range(d - 1):
        r, s, r2 = c3[k].shape
        u, sv, v = exact_svd(c3[k].reshape(r * s, r2))
        keep = len(sv)
        if delta is not None:
            keep = rank_for_tail(sv, delta)
        if max_ranks is not None:
            keep = min(keep, int(max_ranks[k]))
        keep = max(1, keep)
        c3[k] = u[:, :keep].reshape(r, s, keep)
        nxt = c3[k + 1]
        carry = sv[:keep, None] * v[:, :keep].mT  # (keep, r2)
        c3[k + 1] = (carry @ nxt.reshape(nxt.shape[0], -1)).reshape(keep, *nxt.shape[1:])
    return [c.reshape(c.shape[0], *s[1:-1], c.shape[-1]) for c, s in zip(c3, shapes, strict=True)]
