"""What a transform plugin provides: :class:`Transform`, :class:`Decision`, :class:`Context`.

A plugin registers one :class:`Transform` per name through the
``register_transforms`` hook (see :mod:`tnsurgery.hookspecs`). The surgery
pipeline calls ``plan`` for every target module to learn what would happen
(resolved settings, sizes, predicted error, or a reason to skip) without
touching the model, then ``build`` to make the replacement module from the
trained one. :class:`RankOptions` holds the rank options shared by every
rank-based transform, so that they all read the same way in a spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from tnsurgery.stats import InputStats

RANK_OPTIONS = ("rank", "rank_ratio", "param_ratio", "energy", "max_error")


@dataclass
class Context:
    """What the pipeline knows about one target when it calls a transform.

    Attributes:
        name: dotted module name of the target in the model.
        input_shape: shape of the target's first input on the sample input,
            or ``None`` when no sample input was given (or tracing could not
            see the call).
        decision: during ``build``, the :class:`Decision` that ``plan``
            returned for this target (its ``state`` may carry work to reuse,
            e.g. an SVD); ``None`` during ``plan``.
        input_stats: with a spec-level calibration, the second moment of the
            target's inputs on the data (:class:`tnsurgery.stats.InputStats`);
            ``None`` otherwise.
        damping: the spec's calibration damping (relative ridge on the input
            moment); ``None`` without calibration (transforms default to 1e-2).
        plan_only: ``plan`` is called only to report (``tnsurgery plan``, the
            budget's candidates): no ``build`` will follow with this decision,
            so nothing needs to be kept in ``Decision.state``.
        cache: the budget planner calls ``plan`` at many ranks with one dict
            per layer: a transform may keep a rank-independent decomposition
            there (``None``: no cache).
    """

    name: str
    input_shape: tuple[int, ...] | None = None
    decision: Decision | None = None
    input_stats: InputStats | None = None
    damping: float | None = None
    plan_only: bool = False
    cache: dict[Any, Any] | None = None

    @property
    def extras(self) -> dict[str, Any]:
        """The typed fields under the keys of the former string-keyed ``extras``
        (``input_stats``, ``damping``, ``plan_only``, ``decomposition_cache``), for
        plugins written against it; read-only, only the fields that are set."""
        legacy = {
            "input_stats": self.input_stats,
            "damping": self.damping,
            "plan_only": self.plan_only or None,
            "decomposition_cache": self.cache,
        }
        return {k: v for k, v in legacy.items() if v is not None}


@dataclass
class Decision:
    """The outcome of planning one target.

    Attributes:
        resolved: the settings actually used, JSON-compatible (e.g.
            ``{"rank": 64, "method": "randomized"}``); written in the plan and
            the manifest.
        params_after: parameter count of the replacement.
        flops_after: FLOPs of the replacement on the target's input shape
            (``None`` when unknown).
        predicted_error: relative Frobenius error of the replacement's dense
            weight against the original weight, when the transform can
            predict it (``None`` otherwise).
        predicted_output_error: relative error of the layer's output on the
            calibration data, ``‖(W − Ŵ) X‖ / ‖W X‖``, when the transform used
            ``ctx.input_stats`` (``None`` otherwise).
        bytes_after: bytes the replacement stores, when not simply its
            parameters in their dtype (e.g. ``qat``: the packed integers export
            writes); ``None``: counted from ``params_after``.
        skip_reason: set when the target is left as it is (e.g. it would not
            shrink); the pipeline then reports it and never calls ``build``.
        state: private to the transform: anything ``plan`` computed that
            ``build`` can reuse (``ctx.decision.state``). Never serialized.
    """

    resolved: dict[str, Any] = field(default_factory=dict)
    params_after: int | None = None
    flops_after: int | None = None
    predicted_error: float | None = None
    predicted_output_error: float | None = None
    bytes_after: int | None = None
    skip_reason: str | None = None
    state: Any = None
    params: Any = None  # set by the pipeline: the params this target was planned with


PlanFn = Callable[[nn.Module, BaseModel, Context], Decision]
BuildFn = Callable[[nn.Module, BaseModel, Context], nn.Module]
RefitFn = Callable[[nn.Module, nn.Module, Any, Context], "float | None"]


@dataclass(frozen=True)
class Transform:
    """A named transform, as a plugin registers it.

    Attributes:
        name: the name used as ``"transform"`` in a spec rule.
        params_model: pydantic model validating the rule's ``"params"``;
            declare it with ``extra="forbid"`` so unknown keys are errors.
        module_types: module classes the transform accepts; a rule only
            targets modules that are instances of one of them.
        build: ``build(module, params, ctx) -> nn.Module`` makes the
            replacement from the trained module. It must not modify
            ``module``. ``ctx.decision`` holds what ``plan`` returned.
        plan: ``plan(module, params, ctx) -> Decision``; optional. Without
            it the pipeline builds the replacement to measure it.
        layers: the module classes ``build`` may return. They are what
            :func:`tnsurgery.load` may instantiate from a manifest, so each
            needs ``config()`` and ``from_config()`` (see
            :class:`tnsurgery.layers.base.SurgeryLayer`).
        description: one line for ``tnsurgery plugins``.
        refit: ``refit(new, old, stats, ctx) -> error | None``; optional. With
            ``"calibration": {"sequential": true}``, called after the build,
            layer by layer in call order: ``stats`` is a
            :class:`tnsurgery.stats.CrossStats` of the inputs ``new``
            receives in the surgered model (``X_c``) and ``old`` in the
            original (``X_o``). Re-solve ``new``'s tensors in place (same
            shapes) to minimize ``‖X_o Wᵀ − X_c Ŵᵀ‖`` and return that relative
            output error, or ``None`` when the layer cannot be refitted.
            ``ctx.damping`` holds the spec's damping.
        refits: the replacement classes ``refit`` accepts (empty: every one);
            only those layers get the (costly) sequential pass.
        export: ``export(layer) -> nn.Module``; optional. Makes the deployable
            layer from a trained one of the classes in ``exports`` (``qat``: a
            ``QATLayer`` becomes a ``QuantizedLayer`` storing integers), for
            :func:`tnsurgery.convert` / ``tnsurgery export``. It must not modify
            ``layer``; a :class:`~tnsurgery.errors.UserInputError` it raises
            (e.g. a quantizer that never saw data) is shown to the user. The
            layer it returns must be one of ``layers``.
        exports: the layer classes ``export`` accepts.
    """

    name: str
    params_model: type[BaseModel]
    module_types: tuple[type[nn.Module], ...]
    build: BuildFn
    plan: PlanFn | None = None
    layers: tuple[type[nn.Module], ...] = ()
    description: str = ""
    refit: RefitFn | None = None
    refits: tuple[type[nn.Module], ...] = ()
    export: Callable[[nn.Module], nn.Module] | None = None
    exports: tuple[type[nn.Module], ...] = ()


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class: how manifests name a layer class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def build_from_plan(name: str, plan: PlanFn) -> BuildFn:
    """A ``build`` for transforms whose ``plan`` already makes the layer (in
    ``Decision.state``, to measure its exact error): it returns that layer, on the
    module's device, planning again when called without a decision."""

    def build(module: nn.Module, params: BaseModel, ctx: Context) -> nn.Module:
        decision = ctx.decision if ctx.decision is not None else plan(module, params, ctx)
        if decision.skip_reason:
            raise ValueError(f"cannot apply {name} to {ctx.name}: {decision.skip_reason}")
        return decision.state.to(device=module.weight.device)

    build.__doc__ = f"The layer that ``{name}``'s plan made (planned again if needed)."
    return build


class RankOptions(BaseModel):
    """Rank options shared by every rank-based transform: give exactly one.

    - ``rank``: the rank itself.
    - ``rank_ratio``: fraction of the full rank ``min(out, in)``.
    - ``param_ratio``: fraction of the layer's parameters to keep (the bias, kept
      as it is, counts on both sides).
    - ``energy``: fraction of the squared singular values to keep.
    - ``max_error``: relative Frobenius error allowed on the weight.
    """

    model_config = ConfigDict(
        extra="forbid",
        # editors see "at most one" (none is valid when the spec's budget picks ranks)
        json_schema_extra=lambda schema, cls: schema.update(
            {
                "not": {
                    "anyOf": [
                        {"required": [a, b]}
                        for i, a in enumerate(cls.rank_fields)
                        for b in cls.rank_fields[i + 1 :]
                    ]
                }
            }
        ),
    )

    rank: int | None = Field(None, gt=0, strict=True, description="Rank to keep.")
    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="Fraction of the full rank to keep."
    )
    param_ratio: float | None = Field(
        None, gt=0, le=1, description="Fraction of the layer's parameters (bias included) to keep."
    )
    energy: float | None = Field(
        None, gt=0, le=1, description="Fraction of the squared singular values to keep."
    )
    max_error: float | None = Field(
        None, ge=0, lt=1, description="Relative Frobenius error allowed on the weight."
    )

    # Subclasses that add a rank-like option (e.g. tt's ``ranks``) extend this.
    rank_fields: ClassVar[tuple[str, ...]] = RANK_OPTIONS

    @model_validator(mode="after")
    def _exactly_one(self) -> RankOptions:
        given = [k for k in self.rank_fields if getattr(self, k) is not None]
        if len(given) != 1:
            listed = ", ".join(self.rank_fields)
            got = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"give exactly one of {listed} ({got})")
        return self

    @property
    def needs_spectrum(self) -> bool:
        """True when the rank depends on the singular values (``energy``, ``max_error``)."""
        return self.energy is not None or self.max_error is not None

    def describe(self) -> dict[str, Any]:
        """The one rank option given, as ``{name: value}``."""
        return {k: getattr(self, k) for k in self.rank_fields if getattr(self, k) is not None}


class ModeOptions(RankOptions):
    """Rank options plus how a Linear's dimensions are split into tensor modes
    (shared by the tensorized transforms, ``tt`` and ``tucker``)."""

    in_factors: list[int] | None = Field(
        None, description="Factors of in_features (product >= in_features; zero-padded)."
    )
    out_factors: list[int] | None = Field(
        None, description="Factors of out_features (product >= out_features)."
    )
    path: Literal["auto", "contract", "dense"] = Field(
        "auto",
        description="Linear forward: 'auto' picks per call the cheaper of contracting through "
        "the factors and rebuilding the dense weight, by FLOPs.",
    )

    @field_validator("in_factors", "out_factors")
    @classmethod
    def _positive_factors(cls, v):
        if v is not None and (not v or any(x < 1 for x in v)):
            raise ValueError("factors must be a non-empty list of integers >= 1")
        return v

    def mode_count(self) -> int:
        """Modes per side: the factors' length when given, else ``d``."""
        lens = {len(f) for f in (self.in_factors, self.out_factors) if f is not None}
        if len(lens) > 1:
            raise ValueError("in_factors and out_factors need the same length")
        return lens.pop() if lens else self.d


def resolve_rank(
    opts: RankOptions,
    full_rank: int,
    params_per_rank: int,
    dense_params: int,
    sq_singular_values: torch.Tensor | None = None,
    fixed_params: int = 0,
) -> int:
    """Turn the rank option into a rank, clamped to ``[1, full_rank]``.

    Args:
        opts: the validated rank option.
        full_rank: the largest meaningful rank (``min(out, in)`` for a matrix).
        params_per_rank: parameters the replacement needs per unit of rank.
        dense_params: parameters of the dense weight.
        sq_singular_values: all squared singular values, in decreasing order;
            required for ``energy`` and ``max_error``.
        fixed_params: parameters the replacement keeps unchanged (the bias);
            ``param_ratio`` applies to ``dense_params + fixed_params``.
    """
    if opts.rank is not None:
        r = opts.rank
    elif opts.rank_ratio is not None:
        r = math.floor(opts.rank_ratio * full_rank + 0.5)  # halves round up
    elif opts.param_ratio is not None:
        budget = opts.param_ratio * (dense_params + fixed_params) - fixed_params
        r = math.floor(budget / params_per_rank + 1e-9)
    else:
        if sq_singular_values is None:
            raise ValueError("energy/max_error need the singular values")
        s2 = sq_singular_values.double()
        total = float(s2.sum())
        if total == 0.0:
            return 1
        kept = torch.cumsum(s2, 0) / total
        if opts.energy is not None:
            target = opts.energy - 1e-12
            r = int(torch.searchsorted(kept, torch.tensor(target, dtype=kept.dtype))) + 1
        else:
            # error after keeping r values: sqrt(1 - kept[r-1]); smallest r meeting max_error
            err = torch.sqrt(torch.clamp(1.0 - kept, min=0.0))
            ok = torch.nonzero(err <= opts.max_error + 1e-12)
            r = int(ok[0]) + 1 if len(ok) else full_rank
    return max(1, min(int(r), full_rank))


def truncation_error(sq_singular_values: torch.Tensor, rank: int, total_sq: float) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation.

    ``sq_singular_values`` may hold only the leading values (randomized SVD);
    ``total_sq`` is the squared Frobenius norm of the whole matrix.
    """
    if total_sq <= 0:
        return 0.0
    kept = float(sq_singular_values[:rank].double().sum())
    return math.sqrt(max(total_sq - kept, 0.0) / total_sq)


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖approx − ref‖ / ‖ref‖`` in float64 (0 when both are zero, inf when only ref is).

    The one definition of "relative error" used in plans and manifests:
    a transform that predicts its error with it matches what surgery measures.
    """
    a, r = approx.detach().double(), ref.detach().double()
    denom = float(r.norm())
    diff = float((a - r).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom
