"""Kronecker-factored input whitening: data-aware ``tt`` and ``tucker`` on a Linear.

Data-aware ``tt`` and ``tucker`` on a Linear minimize the output error on the
calibration data, ``‖(W − Ŵ) X‖² = tr(ΔW C ΔWᵀ)`` with ``C`` the input second
moment, instead of ``‖W − Ŵ‖``. With ``C = L Lᵀ`` that is the weight error of
``W·L``; a dense ``L`` would mix the input modes and destroy the tensor
structure, so ``C`` is approximated by a Kronecker product ``C_1 ⊗ … ⊗ C_d``
over the input modes, whose Cholesky factor ``L_1 ⊗ … ⊗ L_d`` acts on each mode
separately: the decomposition of ``W ×_k L_kᵀ`` maps back to one of ``W`` by
``L_k⁻ᵀ`` on each input mode, with the same shapes and ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tnsurgery.decompositions.conv1d import linear_features
from tnsurgery.decompositions.tucker import mode_product


def kronecker_factors(c: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Kronecker factors ``C_k (n_k, n_k)`` of a square ``c (N, N)``, ``N = ∏ sizes``
    (indices row-major over the modes, as ``torch.kron`` lays them out).

    Each ``C_k`` is the partial trace of ``c`` over all the other modes, scaled by
    ``tr(c)^{-(d-1)/d}``: then ``tr(C_1 ⊗ … ⊗ C_d) = tr(c)``, and when ``c`` is a
    Kronecker product ``A_1 ⊗ … ⊗ A_d`` the factors reproduce it exactly (each
    ``C_k`` is ``A_k`` up to a scale, the scales multiply to 1). A positive
    (semi)definite ``c`` gives positive (semi)definite factors.
    """
    sizes = [int(s) for s in sizes]
    d, n = len(sizes), math.prod(sizes)
    if tuple(c.shape) != (n, n):
        raise ValueError(f"expected a ({n}, {n}) matrix for modes {sizes}, got {tuple(c.shape)}")
    total = float(torch.diagonal(c).sum())
    scale = total ** (-(d - 1) / d) if total > 0 else 1.0
    t = c.reshape(*sizes, *sizes)
    out = []
    for k, s in enumerate(sizes):
        rest = n // s
        tk = t.movedim((k, d + k), (0, 1)).reshape(s, s, rest, rest)
        ck = torch.diagonal(tk, dim1=2, dim2=3).sum(-1) * scale
        out.append((ck + ck.mT) / 2)
    return out


def cholesky_jittered(c: torch.Tensor, tries: int = 8) -> torch.Tensor | None:
    """Lower Cholesky factor of a symmetric positive semidefinite ``c``, adding the
    least diagonal jitter that makes it succeed (singular ``c``: data that never
    visits some directions, without damping); ``None`` when nothing works."""
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    jitter = 0.0
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(c + jitter * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            return chol
        mean = float(torch.diagonal(c).mean()) if c.numel() else 0.0
        jitter = max(jitter * 10, 1e-10 * max(mean, 1e-30))
    return None


@dataclass
class KroneckerWhitening:
    """Mode-wise whitening of a Linear's input modes.

    ``chol[k]`` (float64, lower triangular) is the Cholesky factor ``L_k`` of the
    k-th Kronecker factor of the layer's (padded) input second moment, so
    ``(⊗ L_k)(⊗ L_k)ᵀ ≈ C``; ``moment`` is the exact ``C (in, in)``, against which
    :meth:`output_error` measures.
    """

    chol: list[torch.Tensor]
    moment: torch.Tensor

    def whiten(self, t: torch.Tensor, first_mode: int) -> torch.Tensor:
        """``t ×_{first_mode+k} L_kᵀ`` for every input mode k: on a weight tensor whose
        input modes start at ``first_mode``, the tensor of ``W·(L_1 ⊗ … ⊗ L_d)``."""
        for k, chol in enumerate(self.chol):
            t = mode_product(t, chol.mT.to(device=t.device, dtype=t.dtype), first_mode + k)
        return t

    def unwhiten(self, t: torch.Tensor, k: int, axis: int) -> torch.Tensor:
        """``L_k⁻ᵀ`` applied along ``axis`` of ``t`` (the index of input mode ``k``): maps
        a core or factor of the whitened weight's decomposition back to the weight's."""
        chol = self.chol[k].to(device=t.device, dtype=t.dtype)
        moved = t.movedim(axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        back = torch.linalg.solve_triangular(chol.mT, flat, upper=True)
        return back.reshape(moved.shape).movedim(0, axis)

    def output_error(self, approx: torch.Tensor, ref: torch.Tensor) -> float:
        """``sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`` with the exact (not Kronecker) ``C``: the
        relative output error ``‖(Ŵ − W) X‖ / ‖W X‖`` on the data (``C = XXᵀ/rows``,
        plus the damping). ``approx`` and ``ref`` are ``(out, in)``."""
        c = self.moment.to(device=ref.device)
        w = ref.detach().double()
        delta = approx.detach().double() - w
        num = float(((delta @ c) * delta).sum())
        den = float(((w @ c) * w).sum())
        if den <= 0.0:
            return 0.0 if num <= 0.0 else math.inf
        return math.sqrt(max(num, 0.0) / den)


def kronecker_whitening(
    moment: torch.Tensor, in_factors: Sequence[int]
) -> KroneckerWhitening | None:
    """The :class:`KroneckerWhitening` of a Linear with input second moment ``moment
    (in, in)`` and input modes ``in_factors`` (``∏ in_factors >= in``: the layer pads
    its inputs with zeros). ``None`` when a factor cannot be made positive definite.

    Padded positions never carry data, so the output does not depend on them; the
    padded second moment is ``diag(C, s·I)`` with ``s`` the mean of ``diag(C)``:
    they count as uncorrelated inputs of average energy, which keeps the Kronecker
    factors positive definite and barely tilted by the padding.
    """
    c = moment.double()
    n_in, n = c.shape[0], math.prod(in_factors)
    if n > n_in:
        mean = float(torch.diagonal(c).mean()) if n_in else 1.0
        padded = torch.zeros(n, n, dtype=c.dtype, device=c.device)
        padded[:n_in, :n_in] = c
        idx = torch.arange(n_in, n, device=c.device)
        padded[idx, idx] = mean if mean > 0 else 1.0
    else:
        padded = c
    chol = []
    for ck in kronecker_factors(padded, in_factors):
        lk = cholesky_jittered(ck)
        if lk is None:
            return None
        chol.append(lk)
    return KroneckerWhitening(chol, c)


def input_whitening(
    module: Any, ctx: Any, whiten: bool, in_factors: Sequence[int]
) -> KroneckerWhitening | None:
    """The Kronecker-factored whitening of a Linear's input modes ``in_factors``, when
    ``whiten`` is on and the transform's context holds calibration statistics of the
    layer's inputs (``ctx.input_stats``, of size ``in_features``); else ``None``.

    ``ctx`` is a :class:`tnsurgery.transform.Context` (read for ``input_stats``,
    ``damping`` and ``cache``). The budget planner plans a layer many times with one
    ``ctx.cache``: the whitening is kept there.
    """
    stats = ctx.input_stats
    features = linear_features(module)  # a Conv1D's too
    in_features = features[0] if features is not None else None
    if not whiten or stats is None or in_features is None or stats.gram.shape[0] != in_features:
        return None
    damping = 1e-2 if ctx.damping is None else float(ctx.damping)
    key = ("kronecker_whitening", tuple(int(n) for n in in_factors), damping)
    if ctx.cache is not None and key in ctx.cache:
        return ctx.cache[key]
    white = kronecker_whitening(stats.second_moment(damping), in_factors)
    if ctx.cache is not None:
        ctx.cache[key] = white
    return white
