"""The parts the quantization layers (:mod:`tnsurgery.layers.qat`) share: what a
quantizer wraps in a module (:func:`quant_axes`), calls with swapped tensors
(:func:`call_with`), the copy of a layer that holds no tensor (:func:`stripped`),
byte and FLOP counts, and :class:`InnerAttributes`, the drop-in attributes a
wrapper answers for the layer it wraps."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from tnsurgery.decompositions.conv1d import conv1d_class, is_conv1d
from tnsurgery.dense_weight import fx_tracing
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.quant import packed_bytes

# The attributes of a Linear or a convolution model code reads on the module it calls,
# answered by a wrapper from the layer it wraps (in_features/out_features: see the
# layers, Conv1D-aware).
WRAPPED_ATTRIBUTES = frozenset({
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
    "groups", "padding_mode", "output_padding", "transposed",
})  # fmt: skip


class InnerAttributes:
    """Mixin of a wrapper layer (before ``SurgeryLayer`` in its bases): it answers what
    model code reads on the module it calls for the layer it wraps, ``in_features`` /
    ``out_features`` (a Conv1D's: the Linear it computes), ``weight``'s shape (that of
    ``to_dense()``) and the conv attributes of :data:`WRAPPED_ATTRIBUTES`, read from
    ``self.inner``. The wrapper gives ``_features()`` (``(in, out)`` of a Linear-like
    inner, else ``None``) and ``_plain_weight_shape()`` (an inner that is no
    ``SurgeryLayer``)."""

    @property
    def in_features(self) -> int:
        """The wrapped layer's ``in_features``."""
        features = self._features()
        return features[0] if features is not None else self.inner.in_features

    @property
    def out_features(self) -> int:
        """The wrapped layer's ``out_features``."""
        features = self._features()
        return features[1] if features is not None else self.inner.out_features

    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of ``to_dense()``: the wrapped layer's weight (a Linear-like
        one's ``(out, in)``, a Conv1D's included)."""
        features = self._features()
        if features is not None:
            return (features[1], features[0])
        if isinstance(self.inner, SurgeryLayer):
            return self.inner.weight_shape()
        return self._plain_weight_shape()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, modules
        except AttributeError:
            if name not in WRAPPED_ATTRIBUTES:
                raise
            inner = self.__dict__.get("_inner") or self.__dict__["_modules"].get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


def quant_axes(module: nn.Module) -> dict[str, int]:
    """The parameters of ``module`` a quantizer wraps, with their channel axis
    (``{}`` when the module declares none)."""
    if isinstance(module, SurgeryLayer):
        return dict(module.quant_axes())
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return {"weight": 0}
    if is_conv1d(module):  # weight (in, out): one scale per output channel, a column
        return {"weight": 1}
    return {}


def conv1d_structure(inner: nn.Module) -> bool:
    """Whether ``inner`` is a Conv1D, or the copy of one that holds no tensor (the
    ``inner`` of a :class:`QuantizedLayer`)."""
    return conv1d_class(type(inner)) and isinstance(getattr(inner, "nf", None), int)


def linear_flops(features: tuple[int, int], input_shape: tuple[int, ...]) -> int:
    """FLOPs of a Linear ``(in, out)`` (a Conv1D, which ``module_flops`` does not know)."""
    rows = 1
    for d in input_shape[:-1]:
        rows *= int(d)
    return 2 * rows * features[0] * features[1]


def key(name: str) -> str:
    return name.replace(".", "__")


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Call(nn.Module):
    """Calls one method of a module (so :func:`functional_call` can swap its
    parameters for a method other than ``forward``)."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


_MISSING = object()


def call_with(
    module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict | None = None
) -> Any:
    """``module(*args, **kwargs)`` with the tensors named in ``tensors`` (dotted
    parameter names) in place of its own: :func:`functional_call`, which refuses to
    run under the TorchScript tracer; there (``torch.onnx.export(dynamo=False)``)
    and under torch.fx's tracer (which cannot call a module outside the model it
    traces: a :class:`Call` is then run by its ``forward``) the tensors are swapped
    in by hand for the call, and back after it."""
    kwargs = kwargs or {}
    fx = fx_tracing()
    if not torch.jit.is_tracing() and not fx:
        return functional_call(module, tensors, args, kwargs)
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            # a parameter's slot (the wrapped layer), or a plain attribute (a stripped one)
            slots = owner._parameters if attr in owner._parameters else owner.__dict__
            saved.append((slots, attr, slots.get(attr, _MISSING)))
            slots[attr] = tensor
        if fx and isinstance(module, Call):
            return module.forward(*args, **kwargs)
        return module(*args, **kwargs)
    finally:
        for slots, attr, old in reversed(saved):
            if old is _MISSING:
                del slots[attr]
            else:
                slots[attr] = old


def export_bytes(inner: nn.Module, axes: dict[str, int], bits: int, granularity: str) -> int:
    total = 0
    for name, p in inner.named_parameters():
        if name in axes:
            channels = p.shape[axes[name]] if granularity == "per_channel" else 1
            total += packed_bytes(p.numel(), bits) + channels * (4 + 4)  # float32 scale, int32 zp
        else:
            total += p.numel() * p.element_size()
    return total


def numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def stripped(inner: nn.Module) -> nn.Module:
    """A copy of ``inner`` that holds no tensor (its parameters are supplied per call)."""
    clone = copy.deepcopy(inner)
    if isinstance(clone, SurgeryLayer):
        clone.clear_dense_cache()
    for name, _ in list(clone.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = clone.get_submodule(owner_name) if owner_name else clone
        del owner._parameters[attr]
    return clone
