"""One target's replacement: why a target is never replaced (:func:`refusal`), the
transform's decision for it (:func:`decide`) and the layer it builds (:func:`build`),
with what a transform raises turned into the project's errors: a ``ValueError`` or an
out-of-memory is a :class:`~tnsurgery.errors.LayerRefusedError` (the spec asks for a
layer that cannot be built: exit 2), anything else a
:class:`~tnsurgery.errors.SurgeryError` (a bug in the transform)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tnsurgery.errors import LayerRefusedError, SurgeryError, UserInputError
from tnsurgery.flops import module_flops
from tnsurgery.plan import TargetPlan
from tnsurgery.transform import Context, Decision, Transform

__all__ = [
    "REFUSALS",
    "build",
    "bytes_after",
    "decide",
    "new_target",
    "record_decision",
    "refusal",
]

# What a transform raises when the layer the spec asks for cannot be built (a value
# that does not fit the module, a size beyond the machine): the spec is to change.
REFUSALS = (
    ValueError,
    MemoryError,
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


def refusal(name, module, call, aliases, tied, method) -> str | None:
    """Why the target ``name`` (``module``) is never replaced, or ``None``."""
    unusable = _unusable_tensor(module)
    if unusable is not None:
        return unusable
    if aliases.get(name):
        return f"the same module is also registered as {', '.join(aliases[name])}; never split"
    if tied.get(name):
        others = ", ".join(tied[name])
        return f"shares its parameters or their storage with {others} (tied weights); never split"
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


def _unusable_tensor(module: nn.Module) -> str | None:
    """Why ``module``'s tensors cannot be replaced (an untrusted file may hold any):
    a parameter that is not real floating point (int, bool, complex), or a
    parameter or buffer on the meta device (no values)."""
    for pname, p in module.named_parameters():
        if p.is_meta:
            return (
                f"its {pname} is on the meta device (it holds no values): only weights "
                "with values are replaced"
            )
        if not p.is_floating_point():
            return f"its {pname} is {p.dtype}: only real floating-point weights are replaced"
    for bname, b in module.named_buffers():
        if b.is_meta:
            return (
                f"its buffer {bname} is on the meta device (it holds no values): only "
                "weights with values are replaced"
            )
    return None


@contextmanager
def _transform_errors(transform: Transform, verb: str, name: str) -> Iterator[None]:
    """A transform's exceptions as the project's errors (see the module docstring)."""
    try:
        yield
    except UserInputError:  # the transform refuses what the spec asks: a user error
        raise
    except REFUSALS as exc:
        raise LayerRefusedError(
            f"transform '{transform.name}' cannot build the layer asked for {name}: "
            f"{type(exc).__name__}: {exc}. Change the rule's params (or exclude {name})."
        ) from exc
    except Exception as exc:
        raise SurgeryError(
            f"transform '{transform.name}' failed to {verb} {name}: {type(exc).__name__}: {exc}"
        ) from exc


def decide(transform: Transform, module: nn.Module, params, ctx: Context) -> Decision:
    """The transform's decision for one target (its ``plan``; a transform without one
    builds the layer now, and the decision carries it)."""
    with _transform_errors(transform, "plan", ctx.name):
        if transform.plan is not None:
            return transform.plan(module, params, ctx)
        new = transform.build(module, params, ctx)
    params = sum(p.numel() for p in new.parameters())
    return Decision(params_after=params, flops_after=module_flops(new, ctx.input_shape), state=new)


def build(transform: Transform, old: nn.Module, tp: TargetPlan, decision: Decision) -> nn.Module:
    """The layer that replaces ``old``: one of the transform's declared layers, on
    ``old``'s device and dtype, in its training mode."""
    ctx = Context(name=tp.name, input_shape=tp.input_shape, decision=decision)
    with _transform_errors(transform, "build", tp.name):
        if transform.plan is None and isinstance(decision.state, nn.Module):
            new = decision.state
        else:
            new = transform.build(old, decision.params, ctx)
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


def bytes_after(module: nn.Module, decision: Decision) -> int | None:
    """Bytes of the replacement: the decision's, else its parameters at ``module``'s
    float size."""
    if decision.bytes_after is not None:
        return decision.bytes_after
    if decision.params_after is None:
        return None
    ref = next((p for p in module.parameters() if p.is_floating_point()), None)
    return decision.params_after * (ref.element_size() if ref is not None else 4)


def new_target(index: int, rule, name: str, module: nn.Module, **fields) -> TargetPlan:
    """The plan's row for target ``name`` of rule ``index`` (a
    :class:`~tnsurgery.spec.Rule`), before anything is decided; ``fields``: more
    :class:`TargetPlan` fields (call shapes)."""
    return TargetPlan(
        rule_index=index,
        rule=rule.label(index),
        name=name,
        module_type=type(module).__name__,
        transform=rule.transform,
        params_before=sum(p.numel() for p in module.parameters()),
        **fields,
    )


def record_decision(
    tp: TargetPlan, module: nn.Module, decision: Decision, overridden: bool = False
) -> bool:
    """Record ``decision`` (its ``params`` set) in ``tp``: its resolved settings, then
    either why the target is skipped (``False``; "kept dense by the spec's budget" when
    a budget's override, ``overridden``, gave it ``param_ratio`` 1.0) or what its
    replacement will be (``True``)."""
    tp.resolved = decision.resolved
    if decision.skip_reason:
        kept = overridden and getattr(decision.params, "param_ratio", None) == 1.0
        tp.status = "skip"
        tp.reason = "kept dense by the spec's budget" if kept else decision.skip_reason
        return False
    tp.params_after = decision.params_after
    tp.flops_after = decision.flops_after
    tp.bytes_after = bytes_after(module, decision)
    tp.predicted_error = decision.predicted_error
    tp.predicted_output_error = decision.predicted_output_error
    return True
