"""Choosing how to factor a layer's dimensions into tensor modes (TT, Tucker on Linear)."""

from __future__ import annotations

import math
from functools import lru_cache

# A factorization is "balanced enough" when its largest factor is at most this
# multiple of the ideal n ** (1 / d); otherwise a slightly larger padded size is used.
MAX_IMBALANCE = 2.0
# Padding never adds more than this fraction of the dimension.
MAX_GIVEN_PAD = 2  # given factors may pad a side to at most twice its size
MAX_PAD_FRACTION = 0.25


@lru_cache(maxsize=4096)
def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """The factorization of ``n`` into ``d`` integers ≥ 1 whose largest factor is
    smallest (ties: the most even), sorted in decreasing order."""
    if d == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    for f in range(math.ceil(n ** (1 / d)), n + 1):
        if n % f:
            continue
        rest = balanced_factors(n // f, d - 1)
        if max(rest) > f:
            continue
        cand = (f, *rest)
        if best is None or _worse(best, cand):
            best = cand
        break  # the smallest admissible largest factor wins
    if best is None:  # fall back: n = n * 1 * 1...
        best = (n,) + (1,) * (d - 1)
    return tuple(sorted(best, reverse=True))


def _worse(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return (max(a), -min(a)) > (max(b), -min(b))


def imbalance(factors: tuple[int, ...]) -> float:
    """Largest factor divided by the ideal ``n ** (1/d)``."""
    n = math.prod(factors)
    return max(factors) / (n ** (1 / len(factors)))


def choose_factors(n: int, d: int) -> tuple[tuple[int, ...], int]:
    """Factors for a dimension of size ``n`` in ``d`` modes, and the padded size.

    Returns ``(factors, padded)`` with ``prod(factors) == padded >= n``. When
    ``n`` itself factors in a balanced way, ``padded == n``; otherwise (e.g. a
    prime) the smallest ``padded`` within ``MAX_PAD_FRACTION`` that does is
    used. Raises ``ValueError`` when nothing within that range works.
    """
    if d < 1:
        raise ValueError("d must be >= 1")
    limit = n + max(0, math.floor(n * MAX_PAD_FRACTION))
    for size in range(n, limit + 1):
        f = balanced_factors(size, d)
        if min(f) >= 2 and imbalance(f) <= MAX_IMBALANCE:
            return f, size
    raise ValueError(
        f"{n} does not factor into {d} balanced modes, even padded by up to "
        f"{MAX_PAD_FRACTION:.0%}; give the factors explicitly or use a smaller d"
    )


def linear_modes(
    in_features: int,
    out_features: int,
    d: int,
    in_factors: list[int] | None = None,
    out_factors: list[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Mode sizes of a Linear's input and output sides: the given factors, else
    :func:`choose_factors` on ``d`` modes. Raises ``ValueError`` when given factors do
    not cover the layer."""
    d = len(in_factors or out_factors or [None] * d)
    in_f = tuple(in_factors) if in_factors else choose_factors(in_features, d)[0]
    out_f = tuple(out_factors) if out_factors else choose_factors(out_features, d)[0]
    if math.prod(in_f) < in_features or math.prod(out_f) < out_features:
        raise ValueError(
            f"factors {list(in_f)} x {list(out_f)} do not cover the layer "
            f"({in_features} -> {out_features})"
        )
    for given, n in ((in_f, in_features), (out_f, out_features)):
        if math.prod(given) > MAX_GIVEN_PAD * n:  # a padded layer of any size: refused
            raise ValueError(
                f"factors {list(given)} pad a side of {n} to {math.prod(given)}, more than "
                f"{MAX_GIVEN_PAD}x its size; give factors whose product is close to {n}"
            )
    return in_f, out_f
