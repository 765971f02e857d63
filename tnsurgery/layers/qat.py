"""Quantization layers: ``QATLayer`` (fake quantization for training) and
``QuantizedLayer`` (integer weights, dequantized on the fly, after export); their
shared parts are in :mod:`tnsurgery.layers.qat_parts`.

Both wrap any layer whose forward reads its own parameters: ``nn.Linear``,
``nn.Conv2d``, Hugging Face's ``Conv1D`` (GPT-2) and every
:class:`~tnsurgery.layers.base.SurgeryLayer`. The tensors quantized and their
channel axes come from the layer's ``quant_axes()`` (``{"weight": 0}`` for
Linear/Conv2d, ``{"weight": 1}`` for Conv1D, whose ``(in, out)`` weight has its
output channels as columns): each low-rank factor,
TT core, Tucker core and factor, CP factor gets its own quantizer. The wrapped
layer runs with its parameters swapped for their (fake-)quantized versions
through :func:`torch.func.functional_call`, so it needs no change of its own.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from tnsurgery.decompositions.conv1d import is_conv1d, linear_features
from tnsurgery.errors import UserInputError
from tnsurgery.flops import module_flops
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.qat_parts import (
    Call,
    InnerAttributes,
    call_with,
    conv1d_structure,
    export_bytes,
    key,
    linear_flops,
    numel,
    qualified,
    quant_axes,
    stripped,
)
from tnsurgery.quant import (
    FakeQuantizer,
    dequantize,
    pack_bits,
    packed_bytes,
    qrange,
    unpack_bits,
)

NOT_EXPORTABLE = (
    "a QAT model (fake quantization, a training-time layer) has no ONNX form: convert it "
    "first, `small = tnsurgery.convert(model)` (or `tnsurgery export MODEL -o OUT` on the "
    "command line), then export the converted model, whose integer layers export to ONNX"
)


class QATLayer(InnerAttributes, SurgeryLayer):
    """``inner`` with every tensor of ``quant_axes(inner)`` fake-quantized in forward
    (and, with ``activations``, its input too).

    Args:
        inner: the layer to quantize (kept as the ``inner`` submodule).
        bits: weight bits, 2 to 8.
        scheme: ``"symmetric"`` or ``"asymmetric"`` (weights and input).
        granularity: ``"per_channel"`` (one scale per slice along each tensor's
            channel axis) or ``"per_tensor"``.
        observer: ``"minmax"`` or ``"ema"`` (see :class:`~tnsurgery.quant.FakeQuantizer`).
        learn_scale: learn the scales (LSQ) instead of observing them.
        activations: bits of the input's fake quantization (per tensor), or
            ``None`` to leave the input in float.

    ``quant_enabled = False`` switches quantization off: the layer then computes
    exactly what ``inner`` computes. The weight quantizers observe ``inner`` at
    construction, so the layer is usable at once; the input quantizer observes
    the first input it sees (and every input in training mode).
    """

    def __init__(
        self,
        inner: nn.Module,
        bits: int = 8,
        scheme: str = "symmetric",
        granularity: str = "per_channel",
        observer: str = "minmax",
        learn_scale: bool = False,
        activations: int | None = None,
    ):
        super().__init__()
        axes = quant_axes(inner)
        if not axes:
            raise ValueError(f"{type(inner).__name__} declares no tensor to quantize")
        if granularity not in ("per_channel", "per_tensor"):
            raise ValueError("granularity must be 'per_channel' or 'per_tensor'")
        self.inner = inner
        for m in inner.modules():  # its tensors are swapped each call: no weight caching
            if isinstance(m, SurgeryLayer):
                m.__dict__["_no_weight_cache"] = True
                m.clear_dense_cache()
        self.bits, self.scheme, self.granularity = bits, scheme, granularity
        self.observer, self.learn_scale, self.activations = observer, learn_scale, activations
        self.axes = axes
        params = dict(inner.named_parameters())
        quantizers = {}
        for name, axis in axes.items():
            p = params[name]
            per_channel = granularity == "per_channel"
            with torch.device(p.device):  # beside its weight (also under a meta-device probe)
                q = FakeQuantizer(
                    bits,
                    scheme,  # type: ignore[arg-type]
                    axis if per_channel else None,
                    p.shape[axis] if per_channel else None,
                    observer,  # type: ignore[arg-type]
                    learn_scale,
                    is_weight=True,
                )
            q.observe(p)
            quantizers[key(name)] = q
        self.weight_quantizers = nn.ModuleDict(quantizers)
        device = next(iter(params.values())).device if params else None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.input_quantizer = (
                FakeQuantizer(
                    activations,
                    scheme,  # type: ignore[arg-type]
                    None,
                    None,
                    observer,  # type: ignore[arg-type]
                    learn_scale,
                    is_weight=False,
                )
                if activations
                else None
            )
        self.register_buffer("_enabled", torch.tensor(True))

    # ---------------------------------------------------------------- switch
    @property
    def quant_enabled(self) -> bool:
        """Whether forward fake-quantizes (``False``: exactly ``inner``)."""
        return bool(self._enabled)

    @quant_enabled.setter
    def quant_enabled(self, value: bool) -> None:
        self._enabled.fill_(bool(value))

    # ------------------------------------------------ drop-in: the wrapped layer's
    def _features(self) -> tuple[int, int] | None:
        return linear_features(self.inner)  # a Conv1D's too

    def _plain_weight_shape(self) -> tuple[int, ...] | None:
        w = self.inner._parameters.get("weight")  # (not a Proxy under torch.fx)
        return tuple(w.shape) if isinstance(w, torch.Tensor) else None

    @property
    def bias(self) -> torch.Tensor | None:
        """``inner``'s bias (never quantized)."""
        return getattr(self.inner, "bias", None)

    # --------------------------------------------------------------- forward
    def _quantized_params(self, observe: bool) -> dict[str, torch.Tensor]:
        params = dict(self.inner.named_parameters())
        out = {}
        for name in self.axes:
            q = self.weight_quantizers[key(name)]
            out[name] = q(params[name]) if observe else q.fake(params[name])
        return out

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise UserInputError(NOT_EXPORTABLE)
        if not self.quant_enabled:
            return self.inner(*args, **kwargs)
        if self.input_quantizer is not None and args:
            args = (self.input_quantizer(args[0]), *args[1:])
        return call_with(self.inner, self._quantized_params(True), args, kwargs)

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``inner`` computes from its fake-quantized tensors (of a
        Conv1D: the ``(out, in)`` weight of the Linear it computes, as ``factorize`` and
        ``tt`` rebuild it)."""
        params = self._quantized_params(False)
        if isinstance(self.inner, SurgeryLayer):
            call = Call(self.inner, "to_dense")
            return call_with(call, {f"module.{k}": v for k, v in params.items()}, ())
        return params["weight"].transpose(0, 1) if is_conv1d(self.inner) else params["weight"]

    # ------------------------------------------------------------- reporting
    def flops(self, input_shape: tuple[int, ...]) -> int:
        if is_conv1d(self.inner):
            return linear_flops(linear_features(self.inner), input_shape)
        return module_flops(self.inner, input_shape) or 0

    def quantized_bytes(self) -> int:
        """Bytes the exported layer stores: packed integers, scales, zero points,
        and every other parameter (bias) in its float dtype."""
        return export_bytes(self.inner, self.axes, self.bits, self.granularity)

    def config(self) -> dict[str, Any]:
        return {
            "inner_layer": qualified(type(self.inner)),
            "bits": self.bits,
            "scheme": self.scheme,
            "granularity": self.granularity,
            "observer": self.observer,
            "learn_scale": self.learn_scale,
            "activations": self.activations,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], current: nn.Module | None = None) -> QATLayer:
        """Wrap ``current`` (the layer now at the target's place) again."""
        config = dict(config)
        expected = config.pop("inner_layer")
        if current is None or qualified(type(current)) != expected:
            got = "nothing" if current is None else qualified(type(current))
            raise ValueError(f"QATLayer wraps a {expected}, found {got} at its place")
        return cls(current, **config)

    def extra_repr(self) -> str:
        act = f", activations={self.activations} bits" if self.activations else ""
        learned = ", learn_scale" if self.learn_scale else ""
        return (
            f"bits={self.bits}, {self.scheme}, {self.granularity}, observer={self.observer}"
            f"{learned}{act}, quantized={list(self.axes)}, enabled={self.quant_enabled}"
        )


class QuantizedLayer(InnerAttributes, SurgeryLayer):
    """A layer stored with integer weights: each quantized tensor as packed
    ``bits``-bit integers (``<key>_q``, uint8), a float scale and an int32 zero
    point per channel; other parameters (bias) stay in float. Forward
    dequantizes (cached in inference) and runs the original layer's code on the
    result, so it computes what the :class:`QATLayer` it came from computed
    (input fake quantization included, with its scale frozen).
    """

    def __init__(
        self,
        inner_layer: str,
        inner_config: dict[str, Any] | None,
        tensors: dict[str, dict[str, Any]],
        floats: dict[str, list[int]],
        input_quant: dict[str, Any] | None = None,
        *,
        inner: nn.Module | None = None,
    ):
        super().__init__()
        self.inner_layer, self.inner_config = inner_layer, inner_config
        self.tensors, self.floats = tensors, floats
        for name, t in tensors.items():
            k = key(name)
            channels = t["shape"][t["axis"]] if t["axis"] is not None else 1
            self.register_buffer(
                f"{k}_q",
                torch.zeros(packed_bytes(numel(t["shape"]), t["bits"]), dtype=torch.uint8),
            )
            self.register_buffer(f"{k}_scale", torch.ones(channels))
            self.register_buffer(f"{k}_zero_point", torch.zeros(channels, dtype=torch.int32))
        self.float_params = nn.ParameterDict(
            {key(n): nn.Parameter(torch.zeros(shape)) for n, shape in floats.items()}
        )
        # The float dtype the layer computes in, carried by an empty buffer (not saved)
        # so that .double(), .to(dtype) and .half() move it, as they move the floats;
        # it is what a layer without float parameters (no bias) dequantizes to.
        dtypes = [t.get("dtype", "float32") for t in tensors.values()]
        dtype = getattr(torch, dtypes[0]) if dtypes else torch.get_default_dtype()
        self.register_buffer("_float_dtype", torch.empty(0, dtype=dtype), persistent=False)
        self.input_quantizer = FakeQuantizer(**input_quant) if input_quant else None
        if self.input_quantizer is not None:
            self.input_quantizer.observer_enabled.fill_(False)
        # the original layer's code, holding no tensor: called with functional_call
        self.__dict__["_inner"] = inner

    @property
    def inner(self) -> nn.Module:
        """The original layer's structure (no tensors: they are supplied at each call)."""
        return self.__dict__["_inner"]

    # ------------------------------------------------------------- building
    @classmethod
    def from_qat(cls, layer: QATLayer) -> QuantizedLayer:
        """Export a :class:`QATLayer`: its tensors on their current grids, as integers."""
        inner = layer.inner
        params = dict(inner.named_parameters())
        tensors, floats = {}, {}
        for name, p in params.items():
            if name in layer.axes:
                q = layer.weight_quantizers[key(name)]
                tensors[name] = {
                    "shape": list(p.shape),
                    "axis": q.axis,
                    "bits": q.bits,
                    "scheme": q.scheme,
                    "dtype": str(p.dtype).removeprefix("torch."),
                }
            else:
                floats[name] = list(p.shape)
        input_quant = layer.input_quantizer.config() if layer.input_quantizer is not None else None
        new = cls(
            qualified(type(inner)),
            inner.config() if isinstance(inner, SurgeryLayer) else None,
            tensors,
            floats,
            input_quant,
            inner=stripped(inner),
        )
        ref = next(iter(params.values()))
        new = new.to(ref.device)
        with torch.no_grad():
            for name, t in tensors.items():
                q = layer.weight_quantizers[key(name)]
                k = key(name)
                qmin, _ = qrange(t["bits"], t["scheme"])
                packed = pack_bits(q.quantize(params[name]), t["bits"], qmin)
                getattr(new, f"{k}_q").copy_(packed)
                getattr(new, f"{k}_scale").copy_(q.grid_scale().reshape(-1))
                getattr(new, f"{k}_zero_point").copy_(q.zero_point.reshape(-1))
            for name in floats:
                new.float_params[key(name)] = nn.Parameter(params[name].detach().clone())
            if layer.input_quantizer is not None:
                new.input_quantizer.load_state_dict(layer.input_quantizer.state_dict())
                new.input_quantizer.observer_enabled.fill_(False)
        return new

    # ------------------------------------------------ drop-in: the held layer's
    def _features(self) -> tuple[int, int] | None:
        return self._conv1d_features() or linear_features(self.inner)

    def _plain_weight_shape(self) -> tuple[int, ...] | None:
        t = self.tensors.get("weight") or {}
        shape = t.get("shape") or self.floats.get("weight")
        return tuple(int(s) for s in shape) if shape else None

    @property
    def bias(self) -> torch.Tensor | None:
        """The float bias the layer computes with (``None`` when it has none)."""
        k = key("bias")
        return self.float_params[k] if k in self.float_params else None

    def _conv1d_features(self) -> tuple[int, int] | None:
        """``(in, out)`` when the layer holds a Conv1D (its weight: ``(in, out)``)."""
        if not conv1d_structure(self.inner) or "weight" not in self.tensors:
            return None
        fin, fout = self.tensors["weight"]["shape"]
        return int(fin), int(fout)

    def _dequantized(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.tensors.items():
            k = key(name)
            scale = getattr(self, f"{k}_scale")
            qmin, _ = qrange(t["bits"], t["scheme"])
            q = unpack_bits(
                getattr(self, f"{k}_q"), t["bits"], qmin, tuple(t["shape"]), torch.int16
            )
            w = dequantize(q, scale.float(), getattr(self, f"{k}_zero_point"), t["axis"])
            floats = [p for p in self.float_params.values()]
            out[name] = w.to(floats[0].dtype if floats else self._float_dtype.dtype)
        return out

    def dequantized(self) -> dict[str, torch.Tensor]:
        """The float tensors the layer computes with (cached in inference)."""
        buffers = [b for n, b in self.named_buffers() if not n.startswith("input_quantizer")]
        return self.cached_value("dequantized", buffers, self._dequantized)

    def _all_params(self) -> dict[str, torch.Tensor]:
        params = dict(self.dequantized())
        for name in self.floats:
            params[name] = self.float_params[key(name)]
        return params

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.input_quantizer is not None and args:
            args = (self.input_quantizer(args[0]), *args[1:])
        return call_with(self.inner, self._all_params(), args, kwargs)

    def to_dense(self) -> torch.Tensor:
        params = self._all_params()
        if "weight" in params and not self.inner_config:
            w = params["weight"]
            return w.transpose(0, 1) if self._conv1d_features() is not None else w  # (out, in)
        call = Call(self.inner, "to_dense")
        return call_with(call, {f"module.{k}": v for k, v in params.items()}, ())

    # ------------------------------------------------------------- reporting
    def flops(self, input_shape: tuple[int, ...]) -> int:
        if (features := self._conv1d_features()) is not None:
            return linear_flops(features, input_shape)
        if not isinstance(self.inner, SurgeryLayer):  # counted from its sizes alone
            return module_flops(self.inner, input_shape) or 0
        with torch.no_grad():
            call = Call(self.inner, "flops")
            params = {f"module.{k}": v for k, v in self._all_params().items()}
            return functional_call(call, params, (input_shape,))

    def param_count(self) -> int:
        """Values stored (integers and floats), as the dense layer counted them."""
        return sum(numel(t["shape"]) for t in self.tensors.values()) + sum(
            p.numel() for p in self.float_params.values()
        )

    def config(self) -> dict[str, Any]:
        return {
            "inner_layer": self.inner_layer,
            "inner_config": self.inner_config,
            "tensors": self.tensors,
            "floats": self.floats,
            "input_quant": self.input_quantizer.config() if self.input_quantizer else None,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], current: nn.Module | None = None
    ) -> QuantizedLayer:
        """Rebuild from the layer now at the target's place: the :class:`QATLayer`
        it was exported from (or the layer that QATLayer wrapped)."""
        inner = current.inner if isinstance(current, QATLayer) else current
        if inner is None or qualified(type(inner)) != config["inner_layer"]:
            got = "nothing" if inner is None else qualified(type(inner))
            raise ValueError(
                f"QuantizedLayer holds a {config['inner_layer']}, found {got} at its place"
            )
        return cls(**config, inner=stripped(inner))

    def extra_repr(self) -> str:
        bits = sorted({t["bits"] for t in self.tensors.values()})
        return (
            f"{self.inner_layer.rsplit('.', 1)[-1]}, integer tensors={list(self.tensors)}, "
            f"bits={bits}, float={list(self.floats)}"
        )


