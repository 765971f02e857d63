"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...), recognized without importing transformers.

``transformers.pytorch_utils.Conv1D`` is a Linear whose weight is stored
transposed: ``weight`` is ``(in_features, out_features)``, ``nf`` is
``out_features`` and its forward is ``x @ weight + bias`` on ``(..., in_features)``
inputs. A transform that takes it works on the Linear-equivalent weight
``weight.T`` (``(out, in)``, as PEFT's ``fan_in_fan_out``) and builds the same layer
it builds for an ``nn.Linear``, a drop-in for Conv1D's forward.

transformers is optional: a module is a Conv1D when a class of its MRO is named
``Conv1D`` and it has an integer ``nf`` and a 2-D ``weight`` of ``nf`` columns.
:class:`Conv1D` stands for that test in ``isinstance`` checks (and in a
``Transform``'s ``module_types``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Conv1D", "conv1d_class", "is_conv1d", "linear_features", "linear_weight"]


def conv1d_class(cls: type) -> bool:
    """Whether a class of ``cls``'s MRO is named ``Conv1D`` (transformers' or a copy)."""
    return any(c.__name__ == "Conv1D" for c in getattr(cls, "__mro__", ()))


def is_conv1d(module: Any) -> bool:
    """Whether ``module`` is a Conv1D: a ``Conv1D`` class in its MRO, an integer ``nf``
    and a 2-D ``weight`` ``(in_features, nf)``."""
    if not conv1d_class(type(module)):
        return False
    nf = getattr(module, "nf", None)
    # the parameter itself (read as an attribute under torch.fx, it is a Proxy)
    w = getattr(module, "_parameters", {}).get("weight")
    w = getattr(module, "weight", None) if w is None else w
    return (
        isinstance(nf, int)
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and int(w.shape[1]) == nf
    )


def linear_weight(module: Any) -> torch.Tensor | None:
    """The module's weight as a Linear's ``(out, in)`` matrix: a Conv1D's ``weight.T``
    (a view), any other module's ``weight`` as it is (``None`` when it has none)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    return w.mT if is_conv1d(module) else w


def linear_features(module: Any) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear``-like module (a Conv1D:
    ``(weight.shape[0], nf)``), or ``None`` when it has neither."""
    if is_conv1d(module):
        weight = getattr(module, "_parameters", {}).get("weight")  # (as in is_conv1d)
        weight = module.weight if weight is None else weight
        return int(weight.shape[0]), int(module.nf)
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    return None


class _Conv1DCheck(type):
    """Metaclass of :class:`Conv1D`: ``isinstance`` runs :func:`is_conv1d`."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return is_conv1d(instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return conv1d_class(subclass)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Conv1D here only stands for transformers' Conv1D in isinstance checks")


class Conv1D(metaclass=_Conv1DCheck):
    """Stands for ``transformers.pytorch_utils.Conv1D`` in ``isinstance`` checks and in
    a transform's ``module_types``, with transformers imported or not (never
    instantiated): ``isinstance(m, Conv1D)`` is :func:`is_conv1d`."""
