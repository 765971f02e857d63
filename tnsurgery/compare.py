"""Comparing a surgered model with the original: the relative error of model outputs
(tensors, tuples, dicts, Hugging Face ModelOutputs), each output tensor's and the one
reported as the model's (a Hugging Face model's first output, else the worst), and of
each replaced layer's output on the same input."""

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


def is_model_output(value: Any) -> bool:
    """Whether ``value`` is a Hugging Face ``ModelOutput`` (known by its class, without
    importing transformers)."""
    return any(
        c.__name__ == "ModelOutput" and c.__module__.startswith("transformers")
        for c in type(value).__mro__
    )


def output_errors(reference: Any, output: Any) -> dict[str, float]:
    """The relative error of each floating-point tensor of ``output`` against the same
    tensor of ``reference``, by name (``inf`` where the shapes differ)."""
    errors: dict[str, float] = {}
    for (name, r), (_, o) in zip(float_leaves(reference), float_leaves(output), strict=False):
        errors[name] = math.inf if r.shape != o.shape else relative_error(o, r)
    return errors


def headline(reference: Any, errors: dict[str, float]) -> str | None:
    """The output whose error is the model's: of a Hugging Face output, its first tensor
    (``logits``, ``last_hidden_state``: what users read; ``loss`` only when it is the
    only one); of any other output, the worst (a NaN counts as the worst)."""
    if not errors:
        return None
    names = list(errors)
    if is_model_output(reference):
        return next((n for n in names if n != "output.loss"), names[0])
    return max(names, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])


def output_error(reference: Any, output: Any) -> tuple[float, str]:
    """The relative error of two model outputs, and the name of the tensor it is
    measured on (see :func:`headline`); ``(0.0, "output")`` when neither has a
    floating-point tensor."""
    errors = output_errors(reference, output)
    name = headline(reference, errors)
    return (0.0, "output") if name is None else (errors[name], name)


class SampleInputError(UserInputError):
    """The model fails on the sample input; ``cause`` is the model's error, one line."""

    def __init__(self, exc: Exception) -> None:
        text = str(exc).strip()
        self.cause = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        super().__init__(
            "the model fails on the sample input (is it the input the model takes?): " + self.cause
        )


def check_sample_input(model: nn.Module, sample_input: Any) -> None:
    """Run ``model`` once on ``sample_input``: one it cannot take (a wrong shape, ids
    out of range) is a :class:`SampleInputError` saying so, before any work."""
    with eval_mode(model):
        try:
            call_model(model, sample_input)
        except Exception as exc:
            raise SampleInputError(exc) from None


def verify(original: nn.Module, work: nn.Module, result: Plan, sample_input: Any) -> None:
    """Run both models on ``sample_input``: set the plan's ``output_error`` (and its
    tensor's name, see :func:`headline`), ``output_errors`` (every tensor's) and each
    replaced target's ``output_error`` (its new layer on the inputs the original layer
    received)."""
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
                raise SampleInputError(exc) from None
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
    errors = output_errors(reference, surgered)
    name = headline(reference, errors)
    result.output_errors = errors
    result.output_error, result.output_error_name = (
        (0.0, "output") if name is None else (errors[name], name)
    )


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
