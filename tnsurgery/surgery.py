"""``plan()`` and ``apply()``: the surgery pipeline, and nothing else.

One straight path: spec -> targets (per rule pass) -> plan (trace + each
transform's own estimate) -> replacements built from the trained weights and
swapped in -> verification on the sample input -> manifest. ``plan()`` is
``apply()`` stopped before anything is built on the caller's model.
"""

from __future__ import annotations

import copy
import datetime
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery._version import __version__
from tnsurgery.calibration import CalibrationResult, _to_device, collect
from tnsurgery.errors import MatchError, SurgeryError, UserInputError
from tnsurgery.matching import select
from tnsurgery.plan import PassInfo, Plan, TargetPlan
from tnsurgery.plugins import Registry, get_plugin_manager, get_registry, qualified_name
from tnsurgery.spec import Rule, Spec, load_spec
from tnsurgery.tracing import call_model, eval_mode, module_flops, sharing, tensor_bytes, trace
from tnsurgery.transform import Context, Decision, Transform, relative_error

MANIFEST_ATTR = "_tnsurgery_manifest"
MANIFEST_FORMAT = "tnsurgery.manifest"

Progress = Callable[[int, int, str], None]


def get_manifest(model: nn.Module) -> dict[str, Any] | None:
    """The record of the surgery done on ``model`` (spec, resolved params, errors,
    versions), or ``None`` if it was never surgered."""
    return getattr(model, MANIFEST_ATTR, None)


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
    Later rules see the model as earlier rules would leave it (planned on a
    copy when the spec has several rules).

    Raises:
        SpecError: invalid spec (every problem listed).
        MatchError: a rule matched no module (unless ``allow_empty``).
    """
    spec = load_spec(spec, registry)
    registry = registry or get_registry()
    calib = _calibrate(model, spec, registry)
    if sample_input is None and calib is not None:
        sample_input = _to_device(calib.first_batch, model)
    overrides, budget = _budget(model, spec, registry, sample_input, calib)
    work = copy.deepcopy(model) if len(spec.rules) > 1 else model
    result, _ = _run(
        work, spec, sample_input, allow_empty, registry, False, overrides=overrides, calib=calib
    )
    result.budget = budget
    result.calibration = calib.describe() if calib is not None else None
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
        inplace: modify ``model`` itself. On failure every swap is undone.
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
        SurgeryError: a transform failed; the model is untouched.
    """
    spec = load_spec(spec, registry)
    registry = registry or get_registry()
    trained_first = None
    if teacher is not None and (spec.training is None or spec.training.mode != "distill"):
        raise UserInputError(
            "a teacher was given but the spec does not distill (no 'training' section with "
            "mode 'distill'): it would not be used"
        )
    if spec.training is not None and spec.training.order == "distill_then_compress":
        model, trained_first = _train_dense_first(model, spec, teacher, inplace, registry)
        inplace = True  # the trained copy is the one to operate on
    calib = _calibrate(model, spec, registry, progress, building=True)
    if sample_input is None and calib is not None:
        sample_input = _to_device(calib.first_batch, model)
    overrides, budget = _budget(model, spec, registry, sample_input, calib)
    work = model if inplace else copy.deepcopy(model)
    # the original is needed to verify and to teach; with inplace it is the pre-surgery copy
    train_after = spec.training is not None and trained_first is None
    sequential = spec.calibration is not None and spec.calibration.sequential
    needs_original = sample_input is not None or train_after or sequential
    original = copy.deepcopy(model) if (inplace and needs_original) else model
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        after_rule, report = None, None
        if sequential:
            report = {"groups": 0, "refitted": 0, "not_refittable": 0, "seconds": 0.0}

            def after_rule(index: int, todo: list) -> None:
                _refit(original, work, spec, index, todo, calib, registry, progress, report)

        result, new_modules = _run(
            work,
            spec,
            sample_input,
            allow_empty,
            registry,
            True,
            undo,
            progress,
            overrides,
            calib,
            after_rule,
        )
        result.budget = budget
        result.calibration = calib.describe() if calib is not None else None
        if report is not None:
            calib.batches_seen = None  # not kept past the surgery
            if not report["refitted"] and not report["groups"]:
                report["note"] = (
                    "no replacement can be refitted (transforms with a refit: "
                    + (", ".join(t.name for t in registry.transforms.values() if t.refit) or "none")
                    + ")"
                )
            result.calibration["sequential"] = report
        if sample_input is not None:
            _verify(original, work, result, sample_input)
        if result.totals()["model_params_after"] is None:  # a transform did not count
            result.model_params_after = sum(p.numel() for p in work.parameters())
        result.applied = True
        manifest = _manifest(work, spec, result, new_modules)
        if trained_first is not None:  # recorded, the dense model having had no manifest
            manifest["training"] = trained_first
        get_plugin_manager().hook.after_surgery(model=work, plan=result, manifest=manifest)
        if train_after:
            from tnsurgery.training import train as run_training

            object.__setattr__(work, MANIFEST_ATTR, manifest)
            run_training(work, spec.training, teacher or original, registry=registry)
            manifest = get_manifest(work)
            if sample_input is not None:  # the output error after training
                with eval_mode(original, work):
                    manifest["trained_output_error"] = output_error(
                        call_model(original, sample_input), call_model(work, sample_input)
                    )[0]
    except BaseException:
        for parent, attr, old in reversed(undo):
            parent._modules[attr] = old
        raise
    object.__setattr__(work, MANIFEST_ATTR, manifest)
    return work


def _refit(
    original, work, spec: Spec, index: int, todo: list, calib, registry, progress, report
) -> None:
    """Sequential calibration of one rule's replacements, right after the rule is
    built (so a later rule, e.g. ``qat``, wraps the refitted layers): each layer its
    transform can refit is re-solved in call order on the inputs the surgered model
    now gives it. Records ``resolved["sequential_output_error"]`` (the layer's output
    error on the data) and ``resolved["sequential"]`` (``refitted`` or ``kept``: the
    refit did no better), and updates the target's weight error."""
    from tnsurgery.calibration import refit_sequentially

    t0 = time.perf_counter()
    transform = registry.get(spec.rules[index].transform)
    originals = dict(original.named_modules())
    current = dict(work.named_modules())
    able = [
        tp
        for tp in todo
        if transform.refit is not None
        and tp.name in originals
        and (not transform.refits or isinstance(current[tp.name], transform.refits))
    ]
    report["not_refittable"] += len(todo) - len(able)
    if not able:
        return
    by_name = {tp.name: tp for tp in able}

    def refit(name: str, stats) -> None:
        tp, new, old = by_name[name], current[name], originals[name]
        before = [p._version for p in new.parameters()]
        ctx = Context(name=name, input_shape=tp.input_shape)
        ctx.extras["damping"] = spec.calibration.damping
        err = transform.refit(new, old, stats, ctx)
        if err is None:
            return
        changed = [p._version for p in new.parameters()] != before
        tp.resolved = {
            **(tp.resolved or {}),
            "sequential_output_error": err,
            "sequential": "refitted" if changed else "kept",
        }
        if changed:
            report["refitted"] += 1
            tp.weight_error = _weight_error(old, new)

    try:  # the calibration's X_oᵀX_o is reused: same batches and rows
        report["groups"] += refit_sequentially(
            original, work, list(by_name), calib.batches_seen or [], refit, progress, calib.stats
        )
    except UserInputError:
        raise
    except Exception as exc:
        raise SurgeryError(
            f"sequential calibration of rule {index} ({transform.name}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    report["seconds"] = round(report["seconds"] + time.perf_counter() - t0, 3)


def _train_dense_first(
    model: nn.Module, spec: Spec, teacher: nn.Module | None, inplace: bool, registry: Registry
) -> tuple[nn.Module, dict[str, Any]]:
    """``order: distill_then_compress``: train a copy of the dense model (every
    parameter) before surgery; returns it and the training record."""
    from tnsurgery.training import train as run_training

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
    dense = copy.deepcopy(model)
    dense_opts = opts.model_copy(update={"trainable": "all"})
    result = run_training(dense, dense_opts, teacher, registry=registry)
    record = {
        **result.to_dict(),
        "options": opts.model_dump(mode="json"),
        "order": "distill_then_compress",
    }
    return dense, record


def convert(model: nn.Module, sample_input: Any = None, *, inplace: bool = False) -> nn.Module:
    """Export quantization-aware layers: every ``QATLayer`` (from the ``qat``
    transform) becomes a ``QuantizedLayer`` storing integer tensors (int8, packed
    to ``bits`` per value below 8 bits) with scales and zero points, dequantized
    on the fly; its outputs are those of the fake-quant layer.

    Args:
        model: a model surgered with a ``qat`` rule (and possibly trained).
        sample_input: when given, the exported model's output is compared with
            the fake-quant model's (``output_error`` in the manifest).
        inplace: modify ``model`` itself (rolled back on failure); else a copy.

    Returns:
        The exported model. Its manifest records the conversion (each layer's
        bytes before/after, ``model_bytes_before``/``model_bytes_after``) on top
        of the surgery's, so :func:`tnsurgery.save` / :func:`tnsurgery.load`
        round-trip it.

    Raises:
        UserInputError: the model has no ``QATLayer`` to export.
        SurgeryError: a layer failed to export; the model is untouched.
    """
    from tnsurgery.layers.qat import QATLayer, QuantizedLayer

    targets = [
        n for n, m in model.named_modules() if isinstance(m, QATLayer) and not _inside_qat(model, n)
    ]
    if not targets:
        raise UserInputError(
            "nothing to export: the model has no QAT layer (apply a spec with a 'qat' rule first)"
        )
    work = model if inplace else copy.deepcopy(model)
    reference_model = copy.deepcopy(model) if (inplace and sample_input is not None) else model
    if sample_input is not None:  # input quantizers that never saw an input observe it now
        with eval_mode(work):
            call_model(work, sample_input)
    blind = [
        n
        for n in targets
        if (q := work.get_submodule(n).input_quantizer) is not None and not bool(q.observed)
    ]
    if blind:
        raise UserInputError(
            f"cannot export {', '.join(blind[:3])}: its input quantizer has never seen an "
            "input, so it has no scale; run the model on data (train, or give a sample input: "
            "convert(model, sample_input) / --sample-input) before exporting"
        )
    bytes_before = tensor_bytes(work)
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    records = []
    try:
        for name in targets:
            old = work.get_submodule(name)
            try:
                new = QuantizedLayer.from_qat(old)
                with torch.no_grad():
                    err = relative_error(new.to_dense(), old.to_dense())
            except Exception as exc:
                raise SurgeryError(f"failed to export {name}: {type(exc).__name__}: {exc}") from exc
            _swap(work, name, new, undo)
            records.append(
                {
                    "name": name,
                    "transform": "qat",
                    "operation": "convert",
                    "layer": qualified_name(type(new)),
                    "config": new.config(),
                    "bytes_before": tensor_bytes(old),
                    "bytes_after": tensor_bytes(new),
                    "weight_error": err,
                }
            )
        out_err = out_name = None
        if sample_input is not None:
            with eval_mode(reference_model, work):
                reference = call_model(reference_model, sample_input)
                exported = call_model(work, sample_input)
            out_err, out_name = output_error(reference, exported)
    except BaseException:
        for parent, attr, old in reversed(undo):
            parent._modules[attr] = old
        raise
    previous = get_manifest(work) or {}
    bytes_after = tensor_bytes(work)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tnsurgery_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": previous.get("base_model", qualified_name(type(work))),
        "operation": "convert",
        "spec": previous.get("spec"),
        "replacements": records,
        "not_replaced": [],
        "output_error": out_err,
        "output_error_name": out_name,
        "model_bytes_before": bytes_before,
        "model_bytes_after": bytes_after,
        "plan": None,  # the surgery's plan is in the history, not copied here
        "budget": None,
        "history": ([*previous.get("history", []), _strip_history(previous)] if previous else []),
    }
    object.__setattr__(work, MANIFEST_ATTR, manifest)
    return work


def _inside_qat(model: nn.Module, name: str) -> bool:
    from tnsurgery.layers.qat import QATLayer

    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:i])), QATLayer) for i in range(1, len(parts))
    )


def train(model: nn.Module, spec: Spec | dict | str | Path, teacher: nn.Module | None = None, **kw):
    """Run the spec's ``training`` section alone on a surgered ``model`` (in place);
    ``teacher`` is the original model (needed to distill). See
    :func:`tnsurgery.training.train` for the options; returns its result."""
    from tnsurgery.training import train as run_training

    return run_training(model, spec, teacher, **kw)


def _run(
    work: nn.Module,
    spec: Spec,
    sample_input: Any,
    allow_empty: bool,
    registry: Registry | None,
    build_last: bool,
    undo: list | None = None,
    progress: Progress | None = None,
    overrides: dict | None = None,
    calib: CalibrationResult | None = None,
    after_rule: Callable[[int, list[TargetPlan]], None] | None = None,
) -> tuple[Plan, dict[tuple[int, str], nn.Module]]:
    registry = registry or get_registry()
    result = Plan(
        model_params_before=sum(p.numel() for p in work.parameters()),
        model_bytes_before=tensor_bytes(work),
    )
    built: dict[tuple[int, str], nn.Module] = {}
    undo = undo if undo is not None else []
    for index, rule in enumerate(spec.rules):
        transform = registry.get(rule.transform)
        last = index == len(spec.rules) - 1
        building = build_last or not last
        targets, info = _select(work, rule, index, transform, allow_empty or rule.allow_empty)
        traced = trace(work, targets, sample_input) if targets else None
        if traced is not None:
            info.trace, info.trace_error = traced.describe(), traced.error
        result.passes.append(info)
        aliases, tied = sharing(work)
        modules = dict(work.named_modules())
        decisions: dict[str, Decision] = {}
        for name in targets:
            module = modules[name]
            call = traced.calls[name] if traced else None
            tp = TargetPlan(
                rule_index=index,
                rule=rule.label(index),
                name=name,
                module_type=type(module).__name__,
                transform=rule.transform,
                params_before=sum(p.numel() for p in module.parameters()),
                call_order=call.order if call else None,
                calls=call.calls if call else None,
                input_shape=call.input_shape if call else None,
                output_shape=call.output_shape if call else None,
            )
            tp.flops_before = module_flops(module, tp.input_shape)
            tp.bytes_before = tensor_bytes(module)
            tp.reason = _refusal(name, call, aliases, tied, traced.method if traced else "none")
            if tp.reason:
                tp.status = "refuse"
            else:
                ctx = Context(name=name, input_shape=tp.input_shape)
                ctx.extras["plan_only"] = not building
                if calib is not None and name in calib.stats:
                    ctx.extras["input_stats"] = calib.stats[name]
                    ctx.extras["damping"] = spec.calibration.damping
                params = (overrides or {}).get((index, name), rule.parsed_params)
                decision = _decide(transform, module, params, ctx)
                decision.params = params
                tp.resolved = decision.resolved
                if decision.skip_reason:
                    kept = getattr(params, "param_ratio", None) == 1.0 and (index, name) in (
                        overrides or {}
                    )
                    reason = "kept dense by the spec's budget" if kept else decision.skip_reason
                    tp.status, tp.reason = "skip", reason
                else:
                    tp.params_after = decision.params_after
                    tp.flops_after = decision.flops_after
                    tp.bytes_after = _bytes_after(module, decision)
                    tp.predicted_error = decision.predicted_error
                    tp.predicted_output_error = decision.predicted_output_error
                    decisions[name] = decision
            result.targets.append(tp)
        if not building:
            continue
        if build_last and index == 0:  # applying (not planning): observers see it once
            get_plugin_manager().hook.before_surgery(model=work, plan=result)
        todo = [tp for tp in result.targets if tp.rule_index == index and tp.status == "replace"]
        for done, tp in enumerate(todo):
            if progress:
                progress(done, len(todo), f"{rule.transform} {tp.name}")
            old = modules[tp.name]
            new = _build(transform, old, tp, decisions[tp.name])
            _swap(work, tp.name, new, undo)
            built[(index, tp.name)] = new
            tp.weight_error = _weight_error(old, new)
            if tp.params_after is None:
                tp.params_after = sum(p.numel() for p in new.parameters())
            if tp.bytes_after is None:
                tp.bytes_after = tensor_bytes(new)
        if after_rule is not None:
            after_rule(index, todo)
    return result, built


def _bytes_after(module: nn.Module, decision: Decision) -> int | None:
    if decision.bytes_after is not None:
        return decision.bytes_after
    if decision.params_after is None:
        return None
    ref = next((p for p in module.parameters() if p.is_floating_point()), None)
    return decision.params_after * (ref.element_size() if ref is not None else 4)


def _calibrate(
    model: nn.Module,
    spec: Spec,
    registry: Registry,
    progress: Progress | None = None,
    building: bool = False,
) -> CalibrationResult | None:
    """Input statistics of every module a rule selects on the original model (and,
    ``building`` with sequential calibration, the batches, for the refit pass)."""
    if spec.calibration is None:
        return None
    from tnsurgery import data

    cal = spec.calibration
    names: list[str] = []
    for rule in spec.rules:
        transform = registry.get(rule.transform)
        names += select(model, rule.match, rule.exclude, rule.types, transform.module_types).names
    try:
        batches = data.batches(
            cal.data, model, cal.batch_size, cal.samples, cal.seed, registry=registry
        )
        return collect(
            model,
            names,
            batches,
            progress,
            total=cal.samples,
            keep_batches=building and cal.sequential,
        )
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"calibration: running the model on the data failed: {type(exc).__name__}: {exc}"
        ) from exc


def _budget(
    model, spec: Spec, registry: Registry, sample_input, calib=None
) -> tuple[dict, dict | None]:
    if spec.budget is None:
        return {}, None
    from tnsurgery.budget import allocate

    return allocate(model, spec, registry, sample_input, calib)


def _select(work, rule: Rule, index: int, transform: Transform, allow_empty: bool):
    found = select(work, rule.match, rule.exclude, rule.types, transform.module_types)
    info = PassInfo(
        rule_index=index,
        rule=rule.label(index),
        transform=rule.transform,
        trace="not traced (no target)",
        trace_error=None,
        matched=len(found.names),
        wrong_type=len(found.wrong_type),
        excluded=len(found.excluded),
    )
    if found.names or allow_empty:
        return found.names, info
    candidates = [n for n, m in work.named_modules() if n and isinstance(m, transform.module_types)]
    accepted = " or ".join(t.__name__ for t in transform.module_types)
    parts = [f"{rule.label(index)} matches no {accepted} module"]
    if found.wrong_type:
        shown = ", ".join(found.wrong_type[:5]) + (" ..." if len(found.wrong_type) > 5 else "")
        parts.append(f"matched only modules of other types: {shown}")
    if found.excluded:
        parts.append(f"{len(found.excluded)} matching module(s) removed by 'exclude'")
    near = found.near_misses(candidates, rule.match) or candidates[:5]
    if near:
        parts.append(f"closest {accepted} modules: " + ", ".join(near))
    parts.append('set "allow_empty": true on the rule to allow this')
    raise MatchError(["; ".join(parts)])


def _refusal(name, call, aliases, tied, method) -> str | None:
    if aliases.get(name):
        return f"the same module is also registered as {', '.join(aliases[name])}; never split"
    if tied.get(name):
        return f"shares its parameters with {', '.join(tied[name])} (tied weights); never split"
    if call is None:
        return None
    if call.weight_read_directly:
        return "the model reads this module's weight directly (outside its forward)"
    if call.calls is not None and call.calls > 1:
        return f"called {call.calls} times per forward; replacing it would change every call"
    if call.calls == 0 and method != "none":
        where = "in the traced graph" if method == "fx" else "on the sample input"
        return (
            f"never called {where} (its parent may use its weight directly, "
            "e.g. nn.MultiheadAttention.out_proj)"
        )
    return None


def _decide(transform: Transform, module: nn.Module, params, ctx: Context) -> Decision:
    try:
        if transform.plan is not None:
            return transform.plan(module, params, ctx)
        new = transform.build(module, params, ctx)
    except Exception as exc:
        raise SurgeryError(
            f"transform '{transform.name}' failed to plan {ctx.name}: {type(exc).__name__}: {exc}"
        ) from exc
    params = sum(p.numel() for p in new.parameters())
    return Decision(params_after=params, flops_after=module_flops(new, ctx.input_shape), state=new)


def _build(transform: Transform, old: nn.Module, tp: TargetPlan, decision: Decision) -> nn.Module:
    ctx = Context(name=tp.name, input_shape=tp.input_shape, decision=decision)
    try:
        if transform.plan is None and isinstance(decision.state, nn.Module):
            new = decision.state
        else:
            new = transform.build(old, decision.params, ctx)
    except Exception as exc:
        raise SurgeryError(
            f"transform '{transform.name}' failed to build {tp.name}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(new, transform.layers) or not hasattr(new, "config"):
        declared = ", ".join(c.__name__ for c in transform.layers) or "none"
        raise SurgeryError(
            f"transform '{transform.name}' built a {type(new).__name__} for {tp.name}, "
            f"which is not one of its declared layers ({declared})"
        )
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device)
        if ref.is_floating_point():
            new = new.to(dtype=ref.dtype)
    new.train(old.training)
    return new


def _swap(root: nn.Module, name: str, new: nn.Module, undo: list) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent._modules[attr]
    parent._modules[attr] = new
    undo.append((parent, attr, old))


def _weight_error(old: nn.Module, new: nn.Module) -> float | None:
    if not hasattr(new, "to_dense"):
        return None
    with torch.no_grad():
        w = getattr(old, "weight", None)
        if not isinstance(w, torch.Tensor) and hasattr(old, "to_dense"):
            try:  # a layer made by an earlier rule: its own dense weight
                w = old.to_dense()
            except NotImplementedError:
                return None
        if not isinstance(w, torch.Tensor):
            return None
        try:
            dense = new.to_dense()
        except NotImplementedError:
            return None
        if dense.shape != w.shape:
            return None
        return relative_error(dense, w)


def float_leaves(value: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Floating-point tensors in a model output (tensor, tuple, dict, HF ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)] if value.is_floating_point() else []
    if isinstance(value, dict) or hasattr(value, "items"):
        out = []
        for k, v in value.items():
            out.extend(float_leaves(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, (tuple, list)):
        out = []
        for i, v in enumerate(value):
            out.extend(float_leaves(v, f"{prefix}[{i}]"))
        return out
    return []


def output_error(reference: Any, output: Any) -> tuple[float, str]:
    """Largest relative error over the floating-point tensors of two model outputs."""
    ref, out = float_leaves(reference), float_leaves(output)
    worst, where = 0.0, "output"
    for (name, r), (_, o) in zip(ref, out, strict=False):
        if r.shape != o.shape:
            return math.inf, name
        err = relative_error(o, r)
        if err > worst or where == "output":
            worst, where = err, name
    return worst, where


def _verify(original: nn.Module, work: nn.Module, result: Plan, sample_input: Any) -> None:
    names = [t.name for t in result.replaced()]
    captured: dict[str, tuple] = {}
    modules = dict(original.named_modules())
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs, output):
            captured.setdefault(name, (args, kwargs, output))

        return hook

    try:
        for n in set(names):
            handles.append(modules[n].register_forward_hook(make_hook(n), with_kwargs=True))
        with eval_mode(original, work):
            reference = call_model(original, sample_input)
    finally:
        for h in handles:
            h.remove()
    with eval_mode(original, work):
        surgered = call_model(work, sample_input)
        new_modules = dict(work.named_modules())
        last = {t.name: t for t in result.replaced()}  # a name replaced twice: the final layer
        for t in last.values():
            if t.name in captured and t.name in new_modules:
                args, kwargs, out = captured[t.name]
                if isinstance(out, torch.Tensor):
                    t.output_error = relative_error(new_modules[t.name](*args, **kwargs), out)
    result.output_error, result.output_error_name = output_error(reference, surgered)


def _manifest(
    work: nn.Module, spec: Spec, result: Plan, built: dict[tuple[int, str], nn.Module]
) -> dict:
    replacements = []
    for t in result.replaced():
        new = built[(t.rule_index, t.name)]
        replacements.append(
            {
                "name": t.name,
                "rule_index": t.rule_index,
                "transform": t.transform,
                "layer": qualified_name(type(new)),
                "config": new.config(),
                "resolved": t.resolved,
                "params_before": t.params_before,
                "params_after": t.params_after,
                "predicted_error": t.predicted_error,
                "weight_error": t.weight_error,
                "output_error": t.output_error,
            }
        )
    previous = get_manifest(work)
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tnsurgery_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": qualified_name(type(work)),
        "spec": spec.to_dict(),
        "replacements": replacements,
        "not_replaced": [
            {"name": t.name, "rule_index": t.rule_index, "status": t.status, "reason": t.reason}
            for t in result.targets
            if t.status != "replace"
        ],
        "output_error": result.output_error,
        "output_error_name": result.output_error_name,
        "plan": result.to_dict(),
        "budget": result.budget,
        "history": ([*previous.get("history", []), _strip_history(previous)] if previous else []),
    }


def _strip_history(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "history"}
