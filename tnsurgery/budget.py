"""Global budgets: per-layer ranks chosen to meet a model-wide parameter or FLOP budget.

A spec's ``"budget"`` (``{"params": 0.5}`` or ``{"flops": 0.5}``, optionally
``"rules": [0, 2]``) asks for the targets of those rules to keep that
fraction of their parameters (or FLOPs) *in total*, with the least damage to
the model. Each layer gets its own ``param_ratio``:

1. **Error curve per layer.** For a set of candidate ratios, the transform's
   own ``plan`` gives the size and the relative weight error it would reach.
   With a spec-level calibration the error is the layer's predicted *output*
   error on the calibration data (``predicted_output_error``, e.g. of a
   whitened ``factorize``), not its weight error.
2. **Sensitivity per layer.** Equal layer errors do not hurt the model
   equally (we measured: allocating by each layer's spectral energy made
   all-MiniLM-L6-v2 *worse* than a uniform ratio, with or without
   calibration). With a sample input (with calibration: its first batch),
   each layer is replaced alone by its uniform-ratio approximation and the
   model's relative output error is measured (padding positions left out):
   ``s = out_err² / layer_err²`` is the output damage per unit of squared
   layer error (measured at the candidate closest to the budget's fraction that
   has an error: with none, the layer loses nothing at any candidate and ``s``
   is ``None``). Without a sample input every layer counts the same
   (``s = 1``). A measurement that fails (the transform's ``plan`` or ``build``,
   or the model run with the layer replaced) is a :class:`SurgeryError` naming
   the layer and the cause (a :class:`UserInputError` the transform raises, refusing
   the layer, is passed on as it is): no number is made up for it.
3. **Allocation.** Minimize ``Σ s·err²`` subject to the budget, greedily:
   start every layer at its cheapest candidate and keep buying the upgrade
   (to any of its candidates) with the best damage saved per unit of cost
   that still fits the budget.

Targets of the budget's rules that it does not allocate (tied or aliased, params
without ``param_ratio``, no candidate the transform can plan) are listed under
``"excluded"`` in the report, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from tnsurgery.calibration import CalibrationResult, padding_mask, unpadded
from tnsurgery.compare import float_leaves
from tnsurgery.errors import SurgeryError, UserInputError
from tnsurgery.hooks import hooked
from tnsurgery.spec import Spec
from tnsurgery.targets import RuleTargets
from tnsurgery.tracing import call_model, eval_mode, module_flops, sharing
from tnsurgery.transform import Context, RankOptions

# candidate param_ratio values tried for every layer (1.0 = leave it dense)
RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Candidate:
    """One option for one layer: its ratio, cost after, and weight error."""

    ratio: float
    cost: float
    error: float


@dataclass
class LayerCurve:
    """The options of one budget target, and its sensitivity."""

    rule_index: int
    name: str
    cost_before: float
    candidates: list[Candidate] = field(default_factory=list)
    sensitivity: float | None = 1.0  # None: no candidate has an error to weigh
    sensitivity_ratio: float | None = None  # the candidate it was measured at


def output_vector(output: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every float tensor of ``output``, flattened, without padded positions."""
    leaves = [unpadded(t.detach(), mask).double().flatten() for _, t in float_leaves(output)]
    return torch.cat(leaves) if leaves else torch.zeros(1, dtype=torch.float64)


def allocate(
    model: nn.Module,
    spec: Spec,
    targets: list[RuleTargets],
    sample_input: Any = None,
    calib: CalibrationResult | None = None,
) -> tuple[dict[tuple[int, str], BaseModel], dict[str, Any]]:
    """Per-target params (``param_ratio`` overridden) meeting ``spec.budget``, over
    the ``targets`` of the rules under the budget (each rule's selection on ``model``).

    With ``calib`` (the spec's calibration statistics), each layer's error curve
    is its predicted output error on that data, and its approximations are the
    data-aware ones the transform will build.

    Returns ``(overrides, report)``: ``overrides[(rule_index, name)]`` are the
    params to use for that target; ``report`` is JSON-compatible (budget,
    totals, per-layer ratio, error and sensitivity) and goes in the manifest.
    """
    kind, fraction, rule_ids = terms(spec)
    aliases, tied = sharing(model)
    modules = dict(model.named_modules())
    shapes = _input_shapes(model, modules, sample_input)
    reference = None
    mask = padding_mask(sample_input)
    if sample_input is not None:
        with eval_mode(model):
            reference = output_vector(call_model(model, sample_input), mask)
    damping = spec.calibration.damping if spec.calibration is not None else None
    curves: list[LayerCurve] = []
    excluded: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index in rule_ids:
        rule, transform = spec.rules[index], targets[index].transform
        for name in targets[index].names:
            if name in seen:
                continue
            seen.add(name)
            why = shared_reason(name, aliases, tied)
            module = modules[name]
            curve = None
            if why is None:
                stats = calib.stats.get(name) if calib is not None else None
                extras = {"input_stats": stats, "damping": damping if stats is not None else None}
                shape = shapes.get(name)
                curve, why = layer_curve(module, name, index, rule, transform, kind, shape, extras)
            if curve is None:
                excluded.append({"name": name, "rule_index": index, "reason": why})
                continue
            if reference is not None:
                curve.sensitivity, curve.sensitivity_ratio = sensitivity(
                    model,
                    curve,
                    fraction,
                    module,
                    rule,
                    transform,
                    sample_input,
                    reference,
                    extras,
                    mask,
                )
            curves.append(curve)
    what = "output error on the sample input" if reference is not None else "none"
    return assign(spec, curves, excluded, what, calib is not None)


def terms(spec: Spec) -> tuple[str, float, list[int]]:
    """``(kind, fraction, rule indices)`` of ``spec.budget``: ``"params"`` or
    ``"flops"``, the fraction of it to keep, and the rules under it (default: all)."""
    budget = spec.budget
    kind = "params" if budget.params is not None else "flops"
    fraction = budget.params if budget.params is not None else budget.flops
    rule_ids = budget.rules if budget.rules is not None else list(range(len(spec.rules)))
    return kind, fraction, rule_ids


def assign(
    spec: Spec,
    curves: list[LayerCurve],
    excluded: list[dict[str, Any]],
    sensitivity_what: str,
    calibrated: bool,
) -> tuple[dict[tuple[int, str], BaseModel], dict[str, Any]]:
    """The allocation over ``curves`` (each layer's candidates and sensitivity, however
    they were gathered: :func:`allocate` on a model in memory, or block by block when a
    checkpoint is streamed): the params of each target and the report (see
    :func:`allocate`); ``sensitivity_what`` says what the sensitivities measured."""
    kind, fraction, rule_ids = terms(spec)
    chosen = _greedy(curves, fraction)
    overrides, layers = {}, []
    for curve, cand in zip(curves, chosen, strict=True):
        rule = spec.rules[curve.rule_index]
        overrides[(curve.rule_index, curve.name)] = rule.parsed_params.model_copy(
            update={"param_ratio": cand.ratio}
        )
        layers.append(
            {
                "name": curve.name,
                "rule_index": curve.rule_index,
                "param_ratio": cand.ratio,
                "predicted_error": cand.error,
                "sensitivity": curve.sensitivity,
                "sensitivity_ratio": curve.sensitivity_ratio,
            }
        )
    before = sum(c.cost_before for c in curves)
    after = sum(c.cost for c in chosen)
    report = {
        "kind": kind,
        "fraction": fraction,
        "rules": rule_ids,
        "sensitivity": sensitivity_what,
        "error": "output error on the calibration data" if calibrated else "weight error",
        "cost_before": before,
        "cost_after": after,
        "achieved": after / before if before else None,
        "layers": layers,
        "excluded": excluded,
    }
    return overrides, report


def shared_reason(
    name: str, aliases: dict[str, list[str]], tied: dict[str, list[str]]
) -> str | None:
    """Why target ``name`` is left out of a budget (another name of the same module, or
    tied parameters), or ``None``."""
    if aliases.get(name):
        return f"the same module is also registered as {', '.join(aliases[name])}"
    if tied.get(name):
        return f"shares its parameters or their storage with {', '.join(tied[name])} (tied)"
    return None


def _input_shapes(model, modules, sample_input) -> dict[str, tuple]:
    if sample_input is None:
        return {}
    shapes: dict[str, tuple] = {}

    def hook_for(name):
        def hook(mod, args, kwargs, out):
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    leaves = [(name, m) for name, m in modules.items() if name and not list(m.children())]
    with hooked(leaves, hook_for, with_kwargs=True), eval_mode(model):
        call_model(model, sample_input)
    return shapes


def _rank_params(rule, ratio: float) -> BaseModel:
    """The rule's params at ``param_ratio`` ``ratio`` (every other rank option unset)."""
    params = rule.parsed_params.model_copy(update={"param_ratio": ratio})
    for other in params.rank_fields:
        if other != "param_ratio":
            params = params.model_copy(update={other: None})
    return params


def layer_curve(
    module, name, index, rule, transform, kind, input_shape, extras=None
) -> tuple[LayerCurve | None, str | None]:
    """The layer's candidates, or ``None`` and why it is left out of the budget.

    Raises:
        SurgeryError: the transform failed to plan the layer at a candidate ratio.
    """
    if not isinstance(rule.parsed_params, RankOptions):
        return None, f"the params of transform '{transform.name}' have no param_ratio"
    if transform.plan is None:
        return None, f"transform '{transform.name}' has no plan to predict errors with"
    weight = sum(p.numel() for p in module.parameters())
    before = float(weight) if kind == "params" else float(module_flops(module, input_shape) or 0)
    curve = LayerCurve(index, name, before)
    # one decomposition for every ratio (transforms that support it reuse it)
    ctx = Context(name=name, input_shape=input_shape, plan_only=True, cache={}, **(extras or {}))
    left_out: list[str] = []
    for ratio in RATIOS[:-1]:
        try:
            decision = transform.plan(module, _rank_params(rule, ratio), ctx)
        except UserInputError:  # the transform refuses what the spec asks: a user error
            raise
        except Exception as exc:
            raise SurgeryError(
                f"budget: transform '{transform.name}' failed to plan {name} at param_ratio "
                f"{ratio}: {type(exc).__name__}: {exc}"
            ) from exc
        error = _layer_error(decision)
        cost = None
        if error is not None:
            cost = decision.params_after if kind == "params" else decision.flops_after
        if error is None or cost is None:
            if decision is not None and decision.skip_reason:
                left_out.append(decision.skip_reason)
            continue
        curve.candidates.append(Candidate(ratio, float(cost), error))
    if not curve.candidates:
        reasons = "; ".join(dict.fromkeys(left_out)) or "no error or cost predicted"
        return None, f"no candidate ratio below 1.0 ({reasons})"
    curve.candidates.append(Candidate(1.0, before, 0.0))  # leave it dense
    return curve, None


def _layer_error(decision) -> float | None:
    """The error a candidate is ranked by: the predicted output error on the
    calibration data when the transform reports one, else the weight error."""
    if decision is None or decision.skip_reason:
        return None
    if decision.predicted_output_error is not None:
        return decision.predicted_output_error
    return decision.predicted_error


def sensitivity(
    model, curve, fraction, module, rule, transform, sample_input, reference, extras, mask
) -> tuple[float | None, float | None]:
    """Output damage per unit of squared layer error (the curve's own error measure),
    measured by replacing this one layer by its approximation at the budget's
    ``fraction`` (else, where the transform skips it there or loses nothing, at the
    nearest candidate that has an error); returns it and the ratio it was measured at,
    or ``(None, None)`` when no candidate has an error (nothing to weigh).

    Raises:
        SurgeryError: planning, building or running the model with the approximation
            failed (the layer and the cause named).
    """
    name = curve.name
    lossy = [c.ratio for c in curve.candidates if c.ratio < 1.0 and c.error > 0]
    lossy.sort(key=lambda r: (abs(r - fraction), r))
    for at in dict.fromkeys([fraction, *lossy]) if lossy else []:
        what = (
            f"budget: measuring the sensitivity of {name} "
            f"(transform '{transform.name}', param_ratio {at})"
        )
        params = _rank_params(rule, at)
        ctx = Context(name=name, **extras)
        try:
            decision = transform.plan(module, params, ctx)
            layer_err = _layer_error(decision)
            if not layer_err:  # skipped there, or nothing lost: not a measure
                continue
            ctx.decision = decision
            new = transform.build(module, params, ctx)
        except UserInputError:  # the transform refuses what the spec asks: a user error
            raise
        except Exception as exc:
            raise SurgeryError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[attr] = new
        try:
            with eval_mode(model):
                out = output_vector(call_model(model, sample_input), mask)
        except Exception as exc:
            raise SurgeryError(
                f"{what}: the model failed with the layer replaced: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            parent._modules[attr] = module
        out_err = float((out - reference).norm() / reference.norm().clamp_min(1e-30))
        return max(out_err**2 / layer_err**2, 1e-12), at
    return None, None


def _greedy(curves: list[LayerCurve], fraction: float) -> list[Candidate]:
    """Every layer at its cheapest option, then upgrades by damage saved per unit of
    cost, while the budget allows (any candidate, so a big jump that does not fit
    never blocks a smaller one that does)."""
    limit = fraction * sum(c.cost_before for c in curves)
    chosen = [min(c.candidates, key=lambda x: (x.cost, x.error)) for c in curves]
    return _fill(curves, chosen, limit - sum(c.cost for c in chosen))


def _fill(curves: list[LayerCurve], chosen: list[Candidate], left: float) -> list[Candidate]:
    """Buy the upgrade with the best damage saved per unit of cost that fits, until none does."""
    while True:
        best, best_rate = None, 0.0
        for i, curve in enumerate(curves):
            cur, s = chosen[i], curve.sensitivity or 0.0  # None: no error to weigh
            for c in curve.candidates:
                extra = c.cost - cur.cost
                gain = s * (cur.error**2 - c.error**2)
                if 0 < extra <= left and gain > 0 and gain / extra > best_rate:
                    best, best_rate = (i, c), gain / extra
        if best is None:
            return chosen
        i, c = best
        left -= c.cost - chosen[i].cost
        chosen[i] = c
