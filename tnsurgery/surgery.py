"""``plan()`` and ``apply()``: the surgery pipeline, and nothing else.

One straight path, each step handing its data to the next::

    Spec -> Targets (per rule) -> calibration -> budget -> per rule pass:
    trace + each transform's plan -> build and swap (+ sequential refit)
    -> verification on the sample input -> Manifest

``plan()`` runs that path on a copy and stops before the caller's model is
touched; with ``calibration.sequential`` it builds and refits on the copy too,
so the errors it reports are those ``apply()`` then records. ``convert`` (export)
and ``train`` are re-exported here for the API's one import.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tnsurgery.budget import allocate
from tnsurgery.calibration import CalibrationResult, calibrate, refit_rule
from tnsurgery.compare import (
    check_sample_input,
    float_leaves,
    output_error,
    verify,
    weight_error,
)
from tnsurgery.data import to_device
from tnsurgery.errors import UserInputError
from tnsurgery.evaluation import spec_reference
from tnsurgery.export import convert
from tnsurgery.io.hf_quantizer import attach_if_hf
from tnsurgery.manifest import (
    MANIFEST_ATTR,
    MANIFEST_FORMAT,
    Manifest,
    Replacement,
    get_manifest,
    record,
)
from tnsurgery.plan import Plan
from tnsurgery.plugins import Registry, get_plugin_manager, get_registry
from tnsurgery.replacing import build, decide, new_target, record_decision, refusal
from tnsurgery.spec import Spec, load_spec
from tnsurgery.swap import Swaps, copy_model, restored_on_failure
from tnsurgery.targets import (
    FusedSplit,
    RuleTargets,
    require_a_replacement,
    require_some,
    select_rule,
    select_targets,
    split_fused,
    split_records,
    unsplit_unused,
)
from tnsurgery.tracing import call_model, eval_mode, module_flops, sharing, tensor_bytes, trace
from tnsurgery.training import train
from tnsurgery.transform import Context, Decision, qualified_name

__all__ = [
    "MANIFEST_ATTR",
    "MANIFEST_FORMAT",
    "apply",
    "convert",
    "float_leaves",
    "get_manifest",
    "output_error",
    "plan",
    "train",
]

Progress = Callable[[int, int, str], None]


@dataclass
class _Prepared:
    """What every rule pass needs, computed once from the original model."""

    targets: list[RuleTargets]
    calib: CalibrationResult | None
    sample_input: Any
    overrides: dict[tuple[int, str], Any]
    budget: dict[str, Any] | None
    registry: Registry


def _prepare(
    model: nn.Module,
    spec: Spec,
    registry: Registry,
    sample_input: Any,
    progress: Progress | None,
    keep_batches: bool,
) -> _Prepared:
    targets = select_targets(model, spec)
    if sample_input is not None:
        check_sample_input(model, sample_input)
    calib = calibrate(model, spec, targets, registry, progress, keep_batches=keep_batches)
    if sample_input is None and calib is not None:
        sample_input = to_device(calib.first_batch, model)
    overrides, budget = {}, None
    if spec.budget is not None:
        overrides, budget = allocate(model, spec, targets, sample_input, calib)
    return _Prepared(targets, calib, sample_input, overrides, budget, registry)


def plan(
    model: nn.Module,
    spec: Spec | dict | str | Path,
    sample_input: Any = None,
    *,
    allow_empty: bool = False,
    registry: Registry | None = None,
) -> Plan:
    """What :func:`apply` would do, without touching ``model``.

    Per target: the rule, the transform, the resolved settings (e.g. rank),
    params and FLOPs before/after, the predicted relative error, or the
    reason it is skipped or refused; :meth:`Plan.totals` sums them up.
    Later rules see the model as earlier rules would leave it (built on a
    copy when the spec has several rules); with ``calibration.sequential``
    every rule is built and refitted on the copy, so the plan reports the
    refitted errors that :func:`apply` records.

    Raises:
        SpecError: invalid spec (every problem listed).
        MatchError: a rule matched no module (unless ``allow_empty``).
    """
    spec = load_spec(spec, registry)
    registry = registry or get_registry()
    sequential = spec.calibration is not None and spec.calibration.sequential
    model, _ = split_fused(model, spec, registry, copy=True)  # (MHAs whose parts are targets)
    prep = _prepare(model, spec, registry, sample_input, None, keep_batches=sequential)
    work = copy_model(model) if (len(spec.rules) > 1 or sequential) else model
    with Swaps(work) as swaps:
        result, _ = _run(work, model, spec, prep, allow_empty, sequential, swaps, None, False)
    return result


def apply(
    model: nn.Module,
    spec: Spec | dict | str | Path,
    sample_input: Any = None,
    *,
    inplace: bool = False,
    allow_empty: bool = False,
    registry: Registry | None = None,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Perform the surgery described by ``spec`` and return the surgered model.

    Args:
        model: the trained model; copied first unless ``inplace=True``.
        spec: a :class:`Spec`, a dict, or the path of a JSON/YAML spec.
        sample_input: a tensor, a tuple of positional args or a dict of
            kwargs. When given, call shapes and FLOPs are recorded and the
            surgered model is checked against the original: the output error
            (and each layer's output error) goes into the manifest.
        inplace: modify ``model`` itself. On a failure at any step (calibration,
            budget, build, verification, training) the model is given back exactly
            as it was: same modules, same tensors with the same values, same
            manifest (a copy of its tensors is kept while the surgery runs).
        allow_empty: do not fail on rules that match nothing.
        registry: the transforms to use (installed plugins by default).
        progress: called as ``progress(done, total, message)`` before each
            replacement of a rule pass.
        teacher: the teacher of the spec's ``training`` (``mode: distill``);
            default: the original model. With ``training.order:
            "distill_then_compress"`` the dense model is distilled from it
            first, so it must be another model (or the mode ``finetune``).

    Returns:
        The model (same class, device and dtype as the input) with its
        targets replaced; :func:`get_manifest` on it returns the record
        (``"replacements"``, ``"not_replaced"``, ``"output_error"``, and the
        full plan under ``"plan"``).

    Raises:
        SpecError / MatchError: bad spec; the model is untouched.
        DataSourceError: a data source failed (calibration or training); the model
            is untouched.
        SurgeryError: a transform failed; the model is untouched.
    """
    spec = load_spec(spec, registry)
    registry = registry or get_registry()
    if teacher is not None and (spec.training is None or spec.training.mode != "distill"):
        raise UserInputError(
            "a teacher was given but the spec does not distill (no 'training' section with "
            "mode 'distill'): it would not be used"
        )
    # in place, every step (calibration, budget, build, verification, training) may fail
    # after touching the model: it is then given back exactly as it was
    with restored_on_failure(model) if inplace else nullcontext():
        return _apply(model, spec, sample_input, inplace, allow_empty, registry, progress, teacher)


def _apply(
    model: nn.Module,
    spec: Spec,
    sample_input: Any,
    inplace: bool,
    allow_empty: bool,
    registry: Registry,
    progress: Progress | None,
    teacher: nn.Module | None,
) -> nn.Module:
    trained_first = None
    if spec.training is not None and spec.training.order == "distill_then_compress":
        model, trained_first = _train_dense_first(model, spec, teacher, inplace, registry)
        inplace = True  # the trained copy is the one to operate on
    model, splits = split_fused(model, spec, registry, copy=not inplace)  # MHAs with targets
    inplace = inplace or bool(splits)  # (a split copy is ours to operate on)
    sequential = spec.calibration is not None and spec.calibration.sequential
    reference = spec_reference(model, spec.evaluation, registry)  # the original, scored first
    prep = _prepare(model, spec, registry, sample_input, progress, keep_batches=sequential)
    work = model if inplace else copy_model(model)
    # the original is needed to verify, refit and teach; with inplace it is a copy
    train_after = spec.training is not None and trained_first is None
    needs_original = prep.sample_input is not None or train_after or sequential
    original = copy_model(model) if (inplace and needs_original) else model
    with Swaps(work) as swaps:
        result, built = _run(work, original, spec, prep, allow_empty, True, swaps, progress, True)
        splits = unsplit_unused(work, splits, result, swaps)
        require_a_replacement(result, spec, allow_empty, prep.targets, work, prep.registry)
        if prep.sample_input is not None:
            verify(original, work, result, prep.sample_input)
        if result.totals()["model_params_after"] is None:  # a transform did not count
            result.model_params_after = sum(p.numel() for p in work.parameters())
        result.applied = True
        manifest = build_manifest(work, spec, result, built, splits)
        if trained_first is not None:  # recorded, the dense model having had no manifest
            manifest = manifest.model_copy(update={"training": trained_first})
        get_plugin_manager().hook.after_surgery(
            model=work, plan=result, manifest=manifest.to_dict()
        )
        manifest.attach(work)
        if train_after:
            train(work, spec.training, teacher or original, registry=registry)
            if prep.sample_input is not None:  # the output error after training
                with eval_mode(original, work):
                    err = output_error(
                        call_model(original, prep.sample_input),
                        call_model(work, prep.sample_input),
                    )[0]
                record(work, "trained_output_error", err)
        if reference is not None:  # the surgered (and trained) model beside the original
            record(work, "evaluation", reference.record(work))
    attach_if_hf(work)  # (its save_pretrained writes a directory that loads again)
    return work


def _run(
    work: nn.Module,
    original: nn.Module,
    spec: Spec,
    prep: _Prepared,
    allow_empty: bool,
    build_last: bool,
    swaps: Swaps,
    progress: Progress | None,
    applying: bool,
) -> tuple[Plan, dict[tuple[int, str], nn.Module]]:
    """Every rule pass on ``work``: trace, plan each target, and build (every rule
    but the last, and the last too with ``build_last``) with the sequential refit."""
    result = Plan(
        model_params_before=sum(p.numel() for p in work.parameters()),
        model_bytes_before=tensor_bytes(work),
        budget=prep.budget,
        calibration=prep.calib.describe() if prep.calib is not None else None,
    )
    sequential = spec.calibration is not None and spec.calibration.sequential
    report = {"groups": 0, "refitted": 0, "not_refittable": 0, "seconds": 0.0}
    built: dict[tuple[int, str], nn.Module] = {}
    for index, rule in enumerate(spec.rules):
        # the original's selection holds until an earlier rule changed the model
        targets = prep.targets[index] if not built else select_rule(work, rule, index)
        require_some(work, targets, allow_empty, prep.registry)
        last = index == len(spec.rules) - 1
        decisions = _plan_pass(work, spec, targets, prep, result, last and not build_last)
        if last and not build_last:
            break
        if applying and index == 0:  # observers see it once, before any swap
            get_plugin_manager().hook.before_surgery(model=work, plan=result)
        todo = [tp for tp in result.targets if tp.rule_index == index and tp.status == "replace"]
        modules = dict(work.named_modules())
        for done, tp in enumerate(todo):
            if progress:
                progress(done, len(todo), f"{rule.transform} {tp.name}")
            old = modules[tp.name]
            new = build(targets.transform, old, tp, decisions[tp.name])
            swaps.swap(tp.name, new)
            built[(index, tp.name)] = new
            tp.weight_error = weight_error(old, new)
            if tp.params_after is None:
                tp.params_after = sum(p.numel() for p in new.parameters())
            if tp.bytes_after is None:
                tp.bytes_after = tensor_bytes(new)
        if sequential:
            damping, transform, calib = spec.calibration.damping, targets.transform, prep.calib
            refit_rule(original, work, transform, index, todo, calib, damping, progress, report)
    if sequential:
        if not report["refitted"] and not report["groups"]:
            able = [t.name for t in prep.registry.transforms.values() if t.refit]
            report["note"] = (
                "no replacement can be refitted (transforms with a refit: "
                + (", ".join(able) or "none")
                + ")"
            )
        result.calibration["sequential"] = report
        prep.calib.batches_seen = None  # not kept past the surgery
    return result, built


def _plan_pass(
    work: nn.Module,
    spec: Spec,
    targets: RuleTargets,
    prep: _Prepared,
    result: Plan,
    plan_only: bool,
) -> dict[str, Decision]:
    """Trace one rule pass and plan each of its targets (appended to ``result``);
    returns the decisions of the targets to replace."""
    index, rule, transform = targets.index, targets.rule, targets.transform
    info = targets.pass_info()
    traced = trace(work, targets.names, prep.sample_input) if targets.names else None
    if traced is not None:
        info.trace, info.trace_error = traced.describe(), traced.error
    result.passes.append(info)
    aliases, tied = sharing(work)
    modules = dict(work.named_modules())
    decisions: dict[str, Decision] = {}
    for name in targets.names:
        module = modules[name]
        call = traced.calls[name] if traced else None
        tp = new_target(
            index,
            rule,
            name,
            module,
            call_order=call.order if call else None,
            calls=call.calls if call else None,
            input_shape=call.input_shape if call else None,
            output_shape=call.output_shape if call else None,
        )
        tp.flops_before = module_flops(module, tp.input_shape)
        tp.bytes_before = tensor_bytes(module)
        method = traced.method if traced else "none"
        tp.reason = refusal(name, module, call, aliases, tied, method)
        result.targets.append(tp)
        if tp.reason:
            tp.status = "refuse"
            continue
        stats = prep.calib.stats.get(name) if prep.calib is not None else None
        ctx = Context(
            name=name,
            input_shape=tp.input_shape,
            input_stats=stats,
            damping=spec.calibration.damping if stats is not None else None,
            plan_only=plan_only,
        )
        params = prep.overrides.get((index, name), rule.parsed_params)
        decision = decide(transform, module, params, ctx)
        decision.params = params
        if record_decision(tp, module, decision, (index, name) in prep.overrides):
            decisions[name] = decision
    return decisions


def _train_dense_first(
    model: nn.Module, spec: Spec, teacher: nn.Module | None, inplace: bool, registry: Registry
) -> tuple[nn.Module, dict[str, Any]]:
    """``order: distill_then_compress``: train a copy of the dense model (every
    parameter) before surgery; returns it and the training record."""
    opts = spec.training
    if inplace:
        raise UserInputError(
            "training: order 'distill_then_compress' trains a copy of the dense model before "
            "surgery: it cannot run with inplace=True"
        )
    if opts.mode == "distill" and (teacher is None or teacher is model):
        raise UserInputError(
            "training: order 'distill_then_compress' distills the dense model before surgery, "
            "so it needs a teacher other than the model itself (surgery.apply(..., "
            "teacher=...), tnsurgery apply --teacher), or mode 'finetune' with labels"
        )
    dense = copy_model(model)
    dense_opts = opts.model_copy(update={"trainable": "all"})
    result = train(dense, dense_opts, teacher, registry=registry)
    done = {
        **result.to_dict(),
        "options": opts.model_dump(mode="json"),
        "order": "distill_then_compress",
    }
    return dense, done


def build_manifest(
    work: nn.Module,
    spec: Spec,
    result: Plan,
    built: dict[tuple[int, str], nn.Module],
    splits: list[FusedSplit],
) -> Manifest:
    """The manifest of a surgery: the splits and the replacements ``built`` (their
    layers' configs), what was not replaced and why, the output error, the plan and
    the budget, after the model's earlier manifest (its history)."""
    replacements = split_records(splits)  # replayed first: their parts are replaced next
    for t in result.replaced():
        new = built[(t.rule_index, t.name)]
        replacements.append(
            Replacement(
                name=t.name,
                rule_index=t.rule_index,
                transform=t.transform,
                layer=qualified_name(type(new)),
                config=new.config(),
                resolved=t.resolved,
                params_before=t.params_before,
                params_after=t.params_after,
                predicted_error=t.predicted_error,
                weight_error=t.weight_error,
                output_error=t.output_error,
            )
        )
    return Manifest(
        base_model=qualified_name(type(work)),
        spec=spec.to_dict(),
        replacements=replacements,
        not_replaced=[
            {"name": t.name, "rule_index": t.rule_index, "status": t.status, "reason": t.reason}
            for t in result.targets
            if t.status != "replace"
        ],
        output_error=result.output_error,
        output_error_name=result.output_error_name,
        plan=result.to_dict(),
        budget=result.budget,
    ).after(Manifest.of(work))
