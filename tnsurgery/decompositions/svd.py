"""Truncated SVDs: exact (LAPACK on the fast orientation) and randomized (seeded)."""

from __future__ import annotations

import torch


def randomized_svd(
    a: torch.Tensor, q: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, alg. 4.4 + 5.1).

    The algorithm of ``torch.svd_lowrank``, with two changes that matter here:
    a seeded generator (deterministic without touching the global RNG), and
    the small SVD taken on the tall ``Aᵀ Q`` instead of the wide ``Qᵀ A``,
    which LAPACK does several times faster. Returns ``U (m, q)``, ``S (q,)``,
    ``V (n, q)`` with ``A ≈ U diag(S) Vᵀ``.
    """
    transpose = a.shape[0] < a.shape[1]
    if transpose:  # work on the tall orientation
        a = a.mT
    g = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=g, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):  # power iterations, re-orthonormalized each half-step
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    ub, s, vbh = torch.linalg.svd(a.mT @ basis, full_matrices=False)  # (Qᵀ A)ᵀ, tall
    u, v = basis @ vbh.mT, ub
    return (v, s, u) if transpose else (u, s, v)


def exact_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(S) Vᵀ``; returns ``U, S, V`` (``V`` not transposed).

    LAPACK is handed the row-major matrix's column-major view when that is
    the faster orientation.
    """
    if a.shape[0] < a.shape[1]:
        u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
        return vh.mT, s, u
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.mT


def compute_dtype(w: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is decomposed in float32."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def gram_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the smaller Gram matrix (``A Aᵀ`` or ``Aᵀ A``), largest first.

    Returns ``(eigenvalues, eigenvectors)``: the squared singular values of
    ``A`` and its left (if ``A`` is wide) or right (if tall) singular vectors. A
    stack of same-shaped matrices ``(..., m, n)`` is decomposed in one call.
    """
    wide = a.shape[-2] <= a.shape[-1]
    g = a @ a.mT if wide else a.mT @ a
    evals, evecs = torch.linalg.eigh(g)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def gram_svd(
    a: torch.Tensor, rank: int, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD through :func:`gram_eigh`: ``U (m, r)``, ``S (r,)``, ``V (n, r)``.

    The other factor is ``Aᵀ U`` (or ``A V``) normalized, so ``U S Vᵀ`` is the
    orthogonal projection of ``A`` on the kept singular subspace: the best
    rank-``r`` approximation up to the accuracy of that subspace. The
    singular values are the norms of that product, not square roots of the
    eigenvalues, which keeps small ones accurate. Several times faster than
    LAPACK's SVD on the sizes of neural-network layers. A stack ``(..., m, n)`` gives
    stacked factors.
    """
    evals, evecs = eig if eig is not None else gram_eigh(a)
    basis = evecs[..., :rank]
    wide = a.shape[-2] <= a.shape[-1]
    other = a.mT @ basis if wide else a @ basis  # (n, r) or (m, r): the other side, scaled by S
    s = other.norm(dim=-2)
    other = other / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)
    return (basis, s, other) if wide else (other, s, basis)


def left_singular(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All left singular vectors of ``m`` (columns, by decreasing singular value) and
    the singular values, for truncations that only need ``U`` (HOSVD, TT-SVD,
    whose next step is ``Uᵀ m``).

    A wide matrix goes through the eigenvectors of the small ``m mᵀ`` instead of
    LAPACK's SVD of ``m``: several times faster, and far less hurt by a busy CPU.
    The singular values are then the norms of ``Uᵀ m``'s rows, which keeps the
    small ones accurate (not square roots of tiny eigenvalues).
    """
    if m.shape[0] > m.shape[1]:
        u, s, _ = exact_svd(m)
        return u, s
    _, u = gram_eigh(m)
    s = (u.mT @ m).norm(dim=1)
    order = torch.argsort(s, descending=True)
    return u[:, order], s[order]


def rank_for_tail(s: torch.Tensor, delta: float, slack: float = 0.0) -> int:
    """Fewest leading singular values of ``s`` (decreasing) whose dropped tail has norm
    ``<= delta·(1 + slack)``; at least 1, at most ``len(s)``."""
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s.double().square(), [0]), 0), [0]))
    # tail[i]: the error when i values are kept; keep the fewest (>= 1) within delta
    ok = torch.nonzero(torch.cat([tail[1:], tail.new_zeros(1)]) <= delta * (1 + slack))
    return int(ok[0]) + 1 if len(ok) else len(s)


def effective_rank(weight: torch.Tensor, energy: float = 0.99) -> tuple[int, int]:
    """(rank keeping ``energy`` of the squared singular values, full rank) of a weight."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    s2 = torch.linalg.svdvals(w).square()
    total = float(s2.sum())
    if total == 0:
        return 0, min(w.shape)
    kept = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-9))) + 1, min(w.shape)
