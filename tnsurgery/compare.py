"""Comparing a surgered model with the original: the relative error of model outputs
(tensors, tuples, dicts, Hugging Face ModelOutputs), and of each replaced layer's
output on the same input."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tnsurgery.decompositions.conv1d import linear_weight
from tnsurgery.errors import SurgeryError, UserInputError
from tnsurgery.hooks import hooked
from tnsurgery.plan import Plan
from tnsurgery.tracing import call_model, eval_mode
from tnsurgery.transform import relative_error


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
    """Largest relative error over the floating-point tensors of two model outputs,
    and the name of that tensor."""
    ref, out = float_leaves(reference), float_leaves(output)
    worst, where = 0.0, "output"
    for (name, r), (_, o) in zip(ref, out, strict=False):
        if r.shape != o.shape:
            return math.inf, name
        err = relative_error(o, r)
        if err > worst or where == "output":
            worst, where = err, name
    return worst, where


def check_sample_input(model: nn.Module, sample_input: Any) -> None:
    """Run ``model`` once on ``sample_input``: one it cannot take (a wrong shape, ids
    out of range) is a :class:`UserInputError` saying so, before any work."""
    with eval_mode(model):
        try:
            call_model(model, sample_input)
        except Exception as exc:
            raise UserInputError(
                "the model fails on the sample input (is it the input the model takes?): "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            ) from None


def verify(original: nn.Module, work: nn.Module, result: Plan, sample_input: Any) -> None:
    """Run both models on ``sample_input``: set the plan's ``output_error`` (and its
    tensor's name) and each replaced target's ``output_error`` (its new layer on the
    inputs the original layer received)."""
    names = {t.name for t in result.replaced()}
    captured: dict[str, tuple] = {}
    modules = dict(original.named_modules())

    def make_hook(name):
        def hook(mod, args, kwargs, output):
            captured.setdefault(name, (args, kwargs, output))

        return hook

    with hooked([(n, modules[n]) for n in names], make_hook, with_kwargs=True):
        with eval_mode(original, work):
            try:
                reference = call_model(original, sample_input)
            except Exception as exc:
                raise UserInputError(
                    f"the model fails on the sample input (is it the input the model takes?): "
                    f"{type(exc).__name__}: {exc}"
                ) from None
    with eval_mode(original, work):
        try:
            surgered = call_model(work, sample_input)
        except Exception as exc:
            raise SurgeryError(
                "the surgered model fails on the sample input, where the original runs: a "
                f"replacement layer is not a drop-in for the module it replaced: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        new_modules = dict(work.named_modules())
        last = {t.name: t for t in result.replaced()}  # a name replaced twice: the final layer
        for t in last.values():
            if t.name in captured and t.name in new_modules:
                args, kwargs, out = captured[t.name]
                if isinstance(out, torch.Tensor):
                    t.output_error = relative_error(new_modules[t.name](*args, **kwargs), out)
    result.output_error, result.output_error_name = output_error(reference, surgered)


def weight_error(old: nn.Module, new: nn.Module) -> float | None:
    """Relative error of ``new``'s dense weight against ``old``'s (``old`` may itself be
    a layer an earlier rule made: its own dense weight); ``None`` when either has none."""
    if not hasattr(new, "to_dense"):
        return None
    with torch.no_grad():
        w = linear_weight(old)  # a Conv1D's weight.T: the (out, in) matrix layers rebuild
        if not isinstance(w, torch.Tensor) and hasattr(old, "to_dense"):
            try:
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
