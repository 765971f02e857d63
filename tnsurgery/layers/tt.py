"""``TTLinear``: a Linear layer whose weight is a Tensor-Train matrix (TT-matrix / MPO)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.decompositions.tt import orthogonalize, tt_matrix_full, tt_round
from tnsurgery.layers.base import SurgeryLayer

PATHS = ("auto", "contract", "dense")


def _rows(input_shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in input_shape[:-1])


class TTLinear(SurgeryLayer):
    """``y = x Wᵀ + b`` with ``W`` held as TT cores ``(r_{k-1}, m_k, n_k, r_k)``.

    ``in_features``/``out_features`` may be smaller than the products of the
    factors (the weight was zero-padded to factor well): inputs are padded and
    outputs cropped accordingly.

    Forward picks, per call, the cheaper of two paths by FLOP count: contract
    the input through the cores (left-to-right or right-to-left, whichever
    costs less), or rebuild the dense weight and do one matmul. In inference
    (no grad) the rebuilt weight is cached until a core changes, so the dense
    path then costs exactly a dense layer. ``path`` forces one of them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        d = len(in_factors)
        if len(out_factors) != d or len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise ValueError(
                "need d in_factors, d out_factors and d+1 ranks starting and ending at 1"
            )
        if math.prod(in_factors) < in_features or math.prod(out_factors) < out_features:
            raise ValueError("the factors' products must cover in_features and out_features")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors = tuple(in_factors), tuple(out_factors)
        self.path = path
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], out_factors[k], in_factors[k], ranks[k + 1], **kw))
            for k in range(d)
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if not (device is not None and torch.device(device).type == "meta"):
            self.reset_parameters()

    # ------------------------------------------------------------------ shape
    @property
    def ranks(self) -> list[int]:
        """TT ranks ``[1, r_1, ..., r_{d-1}, 1]``."""
        return [c.shape[0] for c in self.cores] + [1]

    @property
    def in_padded(self) -> int:
        return math.prod(self.in_factors)

    @property
    def out_padded(self) -> int:
        return math.prod(self.out_factors)

    # -------------------------------------------------------------- building
    @classmethod
    def from_cores(
        cls,
        cores: Sequence[torch.Tensor],
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        path: str = "auto",
    ) -> TTLinear:
        """Build from TT-matrix cores ``(r, m, n, r')`` (their dtype and device)."""
        ref = cores[0]
        layer = cls(
            in_features,
            out_features,
            [c.shape[2] for c in cores],
            [c.shape[1] for c in cores],
            [c.shape[0] for c in cores] + [1],
            bias is not None,
            path,
            device="meta",
            dtype=ref.dtype,
        ).to_empty(device=ref.device)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores, strict=True):
                p.copy_(c)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def reset_parameters(self) -> None:
        """Orthogonal init for training from scratch: every core left-orthogonal, the
        last one scaled so ``W`` has the variance of a Kaiming-uniform dense weight."""
        with torch.no_grad():
            for k, core in enumerate(self.cores):
                r, m, n, r2 = core.shape
                mat = torch.empty(r * m * n, r2, dtype=torch.float32)
                if k < len(self.cores) - 1 and r * m * n >= r2:
                    nn.init.orthogonal_(mat)
                else:
                    nn.init.normal_(mat, std=1.0)
                core.copy_(mat.reshape(core.shape))
            # left-orthogonal cores 1..d-1 preserve norms: scale W through the last core
            w = tt_matrix_full([c.float() for c in self.cores])
            target = (1.0 / (3 * self.in_features)) ** 0.5 * math.sqrt(w.numel())
            self.cores[-1].mul_(target / max(float(w.norm()), 1e-12))
            if self.bias is not None:
                self.bias.zero_()
        self.clear_dense_cache()

    # --------------------------------------------------------------- forward
    def to_dense(self) -> torch.Tensor:
        w = tt_matrix_full(list(self.cores))
        return w[: self.out_features, : self.in_features]

    def contraction_flops(self, rows: int, reverse: bool = False) -> int:
        """FLOPs of contracting ``rows`` inputs through the cores (left to right, or
        right to left with ``reverse``)."""
        m, n, r = list(self.out_factors), list(self.in_factors), self.ranks
        if reverse:
            m, n, r = m[::-1], n[::-1], r[::-1]
        total, done_out = 0, 1
        for k in range(len(m)):
            rest_in = math.prod(n[k + 1 :])
            total += 2 * rows * done_out * rest_in * r[k] * n[k] * m[k] * r[k + 1]
            done_out *= m[k]
        return total

    def rebuild_flops(self) -> int:
        """FLOPs of rebuilding the dense weight from the cores."""
        total, prefix = 0, 1
        r = self.ranks
        for k, core in enumerate(self.cores):
            s = core.shape[1] * core.shape[2]
            if k:
                total += 2 * prefix * r[k] * s * r[k + 1]
            prefix *= s
        return total

    def choose_path(self, rows: int, cached: bool = False) -> str:
        """``"dense"``, ``"contract"`` or ``"contract_reverse"``: the cheapest for ``rows``
        inputs (``cached``: the dense weight is already built)."""
        if self.path == "dense":
            return "dense"
        costs = {
            "contract": self.contraction_flops(rows),
            "contract_reverse": self.contraction_flops(rows, reverse=True),
        }
        if self.path == "auto":
            rebuild = 0 if cached else self.rebuild_flops()
            costs["dense"] = rebuild + 2 * rows * self.in_features * self.out_features
        return min(costs, key=costs.get)

    def _contract(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        cores = list(self.cores)
        n, m = list(self.in_factors), list(self.out_factors)
        b = x.shape[0]
        t = x.reshape(b, *n)
        if reverse:  # mirror the network: reversed modes, cores (r', m, n, r)
            t = t.permute(0, *range(len(n), 0, -1))
            cores = [c.permute(3, 1, 2, 0) for c in reversed(cores)]
            n, m = n[::-1], m[::-1]
        rest = math.prod(n)
        state = t.reshape(b, n[0], rest // n[0])  # (rows, r_0·n_1, rest)
        rows = b
        for k, core in enumerate(cores):
            r, mk, nk, r2 = core.shape
            rest //= nk
            state = state.reshape(rows, r * nk, rest).transpose(1, 2)  # (rows, rest, r·n)
            state = state @ core.permute(0, 2, 1, 3).reshape(r * nk, mk * r2)  # (rows, rest, m·r')
            if k + 1 < len(cores):
                nxt = n[k + 1]
                state = state.reshape(rows, nxt, rest // nxt, mk, r2)
                state = state.permute(0, 3, 4, 1, 2)  # (rows, m, r', n_next, rest')
                rows *= mk
            else:
                rows *= mk
        y = state.reshape(b, *m)
        if reverse:
            y = y.permute(0, *range(len(m), 0, -1))
        return y.reshape(b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        cached = self.has_dense_cache() and not torch.is_grad_enabled()
        path = self.choose_path(rows, cached)
        if path == "dense":
            y = F.linear(x2, self.cached_dense(list(self.cores)), self.bias)
        else:
            if self.in_padded > self.in_features:
                x2 = F.pad(x2, (0, self.in_padded - self.in_features))
            y = self._contract(x2, reverse=path == "contract_reverse")
            y = y[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------ reporting
    def flops(self, input_shape: tuple[int, ...]) -> int:
        rows = _rows(input_shape)
        path = self.choose_path(rows, cached=True)
        if path == "dense":
            return 2 * rows * self.in_features * self.out_features
        return self.contraction_flops(rows, reverse=path == "contract_reverse")

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_factors": list(self.in_factors),
            "out_factors": list(self.out_factors),
            "ranks": self.ranks,
            "bias": self.bias is not None,
            "path": self.path,
        }

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        kept = sum(c.numel() for c in self.cores)
        shape = "x".join(
            f"({m},{n})" for m, n in zip(self.out_factors, self.in_factors, strict=True)
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"modes (out,in)={shape}, ranks={self.ranks}, path={self.path}, "
            f"weight params {kept}/{dense} ({kept / dense:.1%})"
        )

    # ------------------------------------------------- TT training toolbox
    def orthogonalize_(self, direction: str = "left") -> TTLinear:
        """Put the cores in left- or right-canonical form (same weight)."""
        with torch.no_grad():
            new = orthogonalize([c.detach() for c in self.cores], direction)
            for p, c in zip(self.cores, new, strict=True):
                p.copy_(c)
        return self

    def round_(
        self, max_rank: int | Sequence[int] | None = None, rel_error: float | None = None
    ) -> TTLinear:
        """TT-round the weight to lower ranks in place (progressive-rank schedules).

        The cores are replaced by new Parameters: rebuild the optimizer after.
        """
        with torch.no_grad():
            new = tt_round([c.detach() for c in self.cores], max_rank, rel_error)
        self.cores = nn.ParameterList(nn.Parameter(c.contiguous()) for c in new)
        self.clear_dense_cache()
        return self

    def tt_stats(self) -> dict[str, list]:
        """Ranks, Frobenius norm and max |value| of each core (for logging)."""
        with torch.no_grad():
            return {
                "ranks": self.ranks,
                "core_norms": [float(c.norm()) for c in self.cores],
                "core_max_abs": [float(c.abs().max()) for c in self.cores],
            }
