"""``TTLinear``: a Linear layer whose weight is a Tensor-Train matrix (TT-matrix / MPO)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from tnsurgery.decompositions.tt import orthogonalize, tt_matrix_full, tt_round
from tnsurgery.layers.tensorized import TensorizedLinear

# Cost model of one matrix product on thin shapes: below this many rows, columns
# or inner size, GEMM kernels run proportionally below peak (measured on CPU:
# benchmarks/bench_tensor.py); and a transpose costs about this many FLOPs per
# element moved.
_FULL_SPEED_DIM = 48
_FLOPS_PER_MOVE = 24
# A contraction measured 1.3-2.8x slower than its modelled cost (small batched
# GEMMs, memory traffic), a dense matmul never: ``auto`` contracts only when the
# model says it costs at most this fraction of the dense path.
_CONTRACT_MARGIN = 0.5
_THIN_BATCHED = 8


class ContractionPlan(NamedTuple):
    """How :class:`TTLinear` runs a call: ``cuts`` group the cores (merged between
    cuts; none: the dense weight), ``forms`` the matmul layout of each step, ``cost``
    the model's estimate, ``flops`` the multiply-adds ×2 of the contraction."""

    cuts: tuple[int, ...]
    forms: tuple[str, ...]
    cost: float
    flops: int


def _gemm_cost(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n * max(1.0, _FULL_SPEED_DIM / max(1, min(m, k, n)))


def _steps(
    shapes: list[tuple[int, int, int, int]], rows: int
) -> tuple[float, int, tuple[str, ...]]:
    """Cost, FLOPs and per-step layout of contracting ``rows`` inputs through cores of
    ``shapes``, left to right (state ``(rows·m_1..m_k, r_k·n_{k+1}, rest)``)."""
    rest = math.prod([s[2] for s in shapes])  # (a list: torch.compile traces it)
    lead, cost, flops, forms = rows, 0.0, 0, []
    for r, m, n, r2 in shapes:
        rest //= n
        flops += 2 * lead * rest * r * n * m * r2
        if rest == 1:
            options = {"A": _gemm_cost(lead, r * n, m * r2)}
        else:
            options = {
                # batched: each product is thin in rest, but the batch keeps the
                # kernel busy (measured): only a very thin rest costs extra
                "A": lead
                * _gemm_cost(m * r2, r * n, _FULL_SPEED_DIM)
                * (rest / _FULL_SPEED_DIM)
                * max(1.0, _THIN_BATCHED / rest),
                "B": _gemm_cost(lead * rest, r * n, m * r2)
                + _FLOPS_PER_MOVE * lead * rest * (r * n + m * r2),
            }
        form = min(options, key=options.get)
        forms.append(form)
        cost += options[form]
        lead *= m
    return cost, flops, tuple(forms)


def _merge_chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """Merge consecutive TT-matrix cores into one ``(r, Πm, Πn, r')`` core."""
    out = cores[0]
    for core in cores[1:]:
        r, m1, n1, _ = out.shape
        _, m2, n2, r2 = core.shape
        out = torch.einsum("amnb,bpqc->ampnqc", out, core).reshape(r, m1 * m2, n1 * n2, r2)
    return out


def _rows(input_shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in input_shape[:-1])


class TTLinear(TensorizedLinear):
    """``y = x Wᵀ + b`` with ``W`` held as TT cores ``(r_{k-1}, m_k, n_k, r_k)``.

    ``in_features``/``out_features`` may be smaller than the products of the
    factors (the weight was zero-padded to factor well): inputs are padded and
    outputs cropped accordingly.

    Forward picks, per call shape, the cheapest of several paths by a cost model
    (:meth:`contraction_plan`): contract the input through the cores, possibly
    after merging neighbouring cores into bigger ones (fewer, fatter matrix
    products), or rebuild the dense weight and do one matmul. In inference (no
    grad) rebuilt and merged cores are cached until a core changes, so the dense
    path then costs exactly a dense layer. ``path`` limits the choice:
    ``"contract"`` never rebuilds the whole weight, ``"dense"`` always does.
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
        self._set_modes(in_features, out_features, in_factors, out_factors, path)
        kw = {"device": device, "dtype": dtype}
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
            if not w.is_meta:  # built on the meta device to check a config: no values
                self.cores[-1].mul_(target / max(float(w.norm()), 1e-12))
            if self.bias is not None:
                self.bias.zero_()
        self.clear_dense_cache()

    # --------------------------------------------------------------- forward
    def to_dense(self) -> torch.Tensor:
        w = tt_matrix_full(list(self.cores))
        return w[: self.out_features, : self.in_features]

    def _group_shapes(self, cuts: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Shapes ``(r, m, n, r')`` of the cores merged between consecutive ``cuts``."""
        groups: list[tuple[int, int, int, int]] = []
        for k, core in enumerate(self.cores):
            r, m, n, r2 = core.shape
            if k == 0 or k in cuts:
                groups.append((r, m, n, r2))
            else:
                r0, m0, n0, _ = groups[-1]
                groups[-1] = (r0, m0 * m, n0 * n, r2)
        return groups

    def contraction_flops(self, rows: int, cuts: Sequence[int] | None = None) -> int:
        """FLOPs of contracting ``rows`` inputs through the cores, left to right.

        ``cuts`` groups the cores: consecutive cores between two cuts are merged
        first (that merge is not counted); by default every core is its own group.
        """
        if cuts is None:
            cuts = range(1, len(self.cores))
        return _steps(self._group_shapes(tuple(cuts)), rows)[1]

    def merge_flops(self, cuts: Sequence[int]) -> int:
        """FLOPs of merging the cores between ``cuts`` (no cuts: the dense rebuild)."""
        total, prefix = 0, None
        for k, core in enumerate(self.cores):
            r, m, n, r2 = core.shape
            if k == 0 or k in cuts:
                prefix = (r, m * n)
            else:
                total += 2 * prefix[0] * prefix[1] * r * m * n * r2
                prefix = (prefix[0], prefix[1] * m * n)
        return total

    def rebuild_flops(self) -> int:
        """FLOPs of rebuilding the dense weight from the cores."""
        return self.merge_flops(())

    def contraction_plan(self, rows: int, reuse: bool = True) -> ContractionPlan:
        """The cheapest way to run ``rows`` inputs through the layer, by a cost model.

        Candidates: every grouping of consecutive cores (merged first, then the
        input contracted through the groups; no cut at all is the dense rebuild
        and one matmul). Each contraction step is a matrix product, costed at its
        FLOPs divided by an efficiency that drops for thin products, plus the
        memory traffic of the transposes it needs. ``reuse``: merged cores are
        cached across calls (inference), so merging is free; otherwise (training,
        compiling) its FLOPs are counted. ``path`` limits the candidates:
        ``"dense"`` to the rebuild, ``"contract"`` to groupings with a cut.
        """
        key = (rows, reuse, self.path, tuple(c.shape for c in self.cores))
        plans = self.__dict__.setdefault("_plans", {})
        if key in plans:
            return plans[key]
        d = len(self.cores)
        best = dense = None
        for mask in range(2 ** (d - 1)):
            cuts = tuple(k for k in range(1, d) if mask >> (k - 1) & 1)
            if (self.path == "dense" and cuts) or (self.path == "contract" and not cuts):
                continue
            if cuts:
                cost, flops, forms = _steps(self._group_shapes(cuts), rows)
            else:  # F.linear on the cropped weight
                flops = 2 * rows * self.in_features * self.out_features
                cost, forms = _gemm_cost(rows, self.in_features, self.out_features), ("A",)
            if not reuse:
                cost += self.merge_flops(cuts)
            plan = ContractionPlan(cuts, forms, float(cost), int(flops))
            if not cuts:
                dense = plan
            elif best is None or plan.cost < best.cost:
                best = plan
        if best is None or (dense is not None and best.cost > _CONTRACT_MARGIN * dense.cost):
            best = dense
        if best is None:  # one core and path 'contract': its only contraction is the matmul
            flops = 2 * rows * self.in_features * self.out_features
            best = ContractionPlan((), ("A",), float(flops), flops)
        plans[key] = best
        return best

    def choose_path(self, rows: int, cached: bool = True) -> str:
        """``"dense"`` or ``"contract"``: the path :meth:`contraction_plan` picks for
        ``rows`` inputs (``cached``: rebuilt weights are reused across calls)."""
        return "contract" if self.contraction_plan(rows, cached).cuts else "dense"

    def _merged(self, cuts: tuple[int, ...]) -> list[torch.Tensor]:
        bounds = [0, *cuts, len(self.cores)]
        cores = list(self.cores)  # not a slice of the ParameterList: that re-wraps as Parameters
        return [_merge_chain(cores[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    def _contract(self, x: torch.Tensor, plan: ContractionPlan) -> torch.Tensor:
        groups = self.cached_value(
            ("groups", plan.cuts), list(self.cores), lambda: self._merged(plan.cuts)
        )
        b = x.shape[0]
        lead, rest, state = b, x.shape[1], x
        for core, form in zip(groups, plan.forms, strict=True):
            r, m, n, r2 = core.shape
            rest //= n
            if rest == 1:  # one matmul: (lead, r·n) @ (r·n, m·r')
                state = state.reshape(lead, r * n) @ core.permute(0, 2, 1, 3).reshape(r * n, m * r2)
            elif form == "A":  # batched over lead: (m·r', r·n) @ (r·n, rest)
                w = core.permute(1, 3, 0, 2).reshape(m * r2, r * n)
                state = torch.matmul(w, state.reshape(lead, r * n, rest))
            else:  # one tall matmul (lead·rest, r·n) @ (r·n, m·r'), back to (lead, m, r', rest)
                t = state.reshape(lead, r * n, rest).transpose(1, 2).reshape(lead * rest, r * n)
                state = t @ core.permute(0, 2, 1, 3).reshape(r * n, m * r2)
                state = state.reshape(lead, rest, m, r2).permute(0, 2, 3, 1)
            lead *= m
        return state.reshape(b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows_forward(x, self._forward_rows)

    def _forward_rows(self, x2: torch.Tensor) -> torch.Tensor:
        plan = self.contraction_plan(x2.shape[0], self.reuses_weights(list(self.cores)))
        if not plan.cuts:
            return self._dense_rows(x2, self.cached_dense(list(self.cores)))
        return self._contracted_rows(x2, lambda t: self._contract(t, plan))

    # ------------------------------------------------------------ reporting
    def flops(self, input_shape: tuple[int, ...]) -> int:
        return self.contraction_plan(_rows(input_shape), reuse=True).flops

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

    # ------------------------------------- training hooks (SurgeryLayer contract)
    def cuttable_ranks(self) -> tuple[int, ...]:
        """The inner TT ranks ``(r_1, ..., r_{d-1})``: progressive rank cuts them
        with :meth:`round_`."""
        return tuple(self.ranks[1:-1])

    def cut_ranks_(self, ranks: Sequence[int]) -> None:
        """:meth:`round_` to at most ``ranks`` (one per inner rank)."""
        self.round_(max_rank=[int(r) for r in ranks])

    def clip_norms_(self, max_norm: float) -> None:
        """Scale down every core whose Frobenius norm exceeds ``max_norm``."""
        with torch.no_grad():
            for c in self.cores:
                norm = float(c.norm())
                if norm > max_norm:
                    c.mul_(max_norm / norm)

    def balance_norms_(self) -> None:
        """Give every core the geometric mean of the cores' norms (the weight is
        unchanged: the scales multiply to 1). Nothing when a core is zero."""
        with torch.no_grad():
            norms = [float(c.norm()) for c in self.cores]
            if all(v > 0 for v in norms):
                target = math.prod(norms) ** (1.0 / len(norms))
                for c, v in zip(self.cores, norms, strict=True):
                    c.mul_(target / v)

    def reorthogonalize_(self) -> None:
        """:meth:`orthogonalize_` to the left-canonical form."""
        self.orthogonalize_("left")

    def training_stats(self) -> dict[str, list]:
        """:meth:`tt_stats`."""
        return self.tt_stats()

    def quant_axes(self) -> dict[str, int]:
        """Each core quantized per slice of its outgoing rank (the last core, whose
        outgoing rank is 1, per slice of its incoming rank)."""
        last = len(self.cores) - 1
        return {f"cores.{k}": 0 if k == last else 3 for k in range(len(self.cores))}

    def tt_stats(self) -> dict[str, list]:
        """Ranks, Frobenius norm and max |value| of each core (for logging)."""
        with torch.no_grad():
            return {
                "ranks": self.ranks,
                "core_norms": [float(c.norm()) for c in self.cores],
                "core_max_abs": [float(c.abs().max()) for c in self.cores],
            }
