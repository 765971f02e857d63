"""Uniform affine quantization: ranges, scales, fake quantization, bit packing.

The arithmetic of the ``qat`` transform and of export, in one place:

- :func:`qrange` and :func:`scale_zero_point` turn an observed range into a
  quantization grid (``symmetric``: zero point 0 and the signed range
  ``[-(2^(b-1)-1), 2^(b-1)-1]``; ``asymmetric``: the unsigned range
  ``[0, 2^b-1]`` with a zero point, so that 0 is exactly representable);
- :func:`fake_quantize` rounds to that grid and back, with a straight-through
  estimator (gradient 1 inside the range, 0 where values were clipped), using
  PyTorch's fused fake-quant ops; :func:`lsq_fake_quantize` does the same with
  a learned step size (LSQ, Esser et al. 2020), whose gradient reaches the scale;
- :func:`quantize` / :func:`dequantize` give the integers export stores, and
  :func:`pack_bits` / :func:`unpack_bits` store them at ``bits`` per value.

``dequantize(quantize(x))`` equals ``fake_quantize(x)`` to the last bit, so an
exported layer computes what the fake-quant layer computed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Scheme = Literal["symmetric", "asymmetric"]
Granularity = Literal["per_tensor", "per_channel"]
ObserverKind = Literal["minmax", "ema"]

_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, scheme: Scheme) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of ``bits``-bit values under ``scheme``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def observed_range(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x``, over everything (``axis=None``) or per slice along ``axis``."""
    x = x.detach().float()
    if axis is None:
        return x.min().reshape(1), x.max().reshape(1)
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def scale_zero_point(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid covering ``[min_val, max_val]`` (and 0): float32 scale, int32 zero point."""
    qmin, qmax = qrange(bits, scheme)
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    if scheme == "symmetric":
        scale = torch.maximum(-lo, hi) / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = (qmin - torch.round(lo / scale.clamp_min(_EPS))).clamp(qmin, qmax)
        zero_point = zero_point.to(torch.int32)
    return scale.clamp_min(_EPS), zero_point


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    scheme: Scheme,
    axis: int | None,
) -> torch.Tensor:
    """Round ``x`` to the grid and back (straight-through gradient inside the range).

    ``scale``/``zero_point`` have one entry (per tensor) or one per slice along
    ``axis`` (per channel). Computed in float32, returned in ``x``'s dtype.
    """
    qmin, qmax = qrange(bits, scheme)
    xf = x.float()
    # the fused ops want float32 scales and int32 zero points (a model cast to
    # bfloat16 casts float buffers too)
    scale, zero_point = scale.float(), zero_point.to(torch.int32)
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(
            xf, scale.reshape(()), zero_point.reshape(()), qmin, qmax
        )
    else:
        y = torch.fake_quantize_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax)
    return y.to(x.dtype)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` exactly, with gradient 1 (``x - x.detach()`` is exactly 0)."""
    return torch.round(x).detach() + (x - x.detach())


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` exactly, with its gradient multiplied by ``g``."""
    return x.detach() + (x - x.detach()) * g


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    scheme: Scheme,
    axis: int | None,
) -> torch.Tensor:
    """:func:`fake_quantize` with a learned step size (LSQ): the gradient reaches
    ``scale`` too, scaled by ``1/sqrt(numel·qmax)`` per the LSQ paper."""
    qmin, qmax = qrange(bits, scheme)
    per = x.numel() // max(1, scale.numel())
    s = _grad_scale(scale.float().abs().clamp_min(_EPS), 1.0 / math.sqrt(per * qmax))
    s = _broadcast(s, x, axis)
    z = _broadcast(zero_point.float(), x, axis)
    # x·(1/s), as quantize() computes it, so that export stores exactly this grid
    q = torch.clamp(_round_ste(x.float() * (1.0 / s)) + z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    scheme: Scheme,
    axis: int | None,
) -> torch.Tensor:
    """The integers ``clamp(round(x/scale) + zero_point)``: int8 (symmetric) or
    uint8 (asymmetric), on exactly the grid :func:`fake_quantize` uses."""
    qmin, qmax = qrange(bits, scheme)
    inv = 1.0 / _broadcast(scale.float(), x, axis)
    q = torch.round(x.detach().float() * inv) + _broadcast(zero_point.float(), x, axis)
    return q.clamp(qmin, qmax).to(torch.int8 if scheme == "symmetric" else torch.uint8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32."""
    z = _broadcast(zero_point.float(), q, axis)
    return (q.float() - z) * _broadcast(scale.float(), q, axis)


def pack_bits(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Store integers of ``bits`` bits (values ``>= qmin``) densely in uint8:
    ``ceil(numel·bits/8)`` bytes. 8 bits is a plain (offset) copy."""
    u = (q.reshape(-1).to(torch.int16) - qmin).to(torch.uint8)
    if bits == 8:
        return u
    shifts = torch.arange(bits, dtype=torch.uint8, device=u.device)
    stream = ((u.unsqueeze(1) >> shifts) & 1).reshape(-1)  # little-endian bits of each value
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=u.device)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(
    packed: torch.Tensor, bits: int, qmin: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the integers, of ``shape`` and ``dtype``."""
    numel = math.prod(shape)
    if bits == 8:
        u = packed[:numel].to(torch.int16)
    else:
        # floor division and remainder by powers of two, not shifts: both ONNX exporters
        # have them (the dynamo one has no aten.__rshift__)
        powers = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=packed.device)
        stream = torch.remainder(
            torch.div(packed.to(torch.int32).unsqueeze(1), powers, rounding_mode="floor"), 2
        )
        stream = stream.reshape(-1)[: numel * bits]
        u = (stream.reshape(numel, bits) * powers[:bits]).sum(dim=1).to(torch.int16)
    return (u + qmin).to(dtype).reshape(shape)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_bits` uses for ``numel`` values."""
    return (numel * bits + 7) // 8


class FakeQuantizer(nn.Module):
    """Observer + fake quantization of one tensor (a weight, a factor, a core, an input).

    Args:
        bits: 2 to 8.
        scheme: ``"symmetric"`` or ``"asymmetric"``.
        axis: channel axis for per-channel scales, or ``None`` (per tensor).
        channels: the size of that axis (``None`` when per tensor).
        observer: ``"minmax"`` (weights: the current tensor's range; inputs: the
            running range over every batch seen) or ``"ema"`` (exponential moving
            average of each batch's range, ``momentum``).
        learn_scale: the scale becomes a Parameter trained by LSQ once observed.
        is_weight: observe the current tensor (weights) rather than a running range.

    Switches (saved in the state dict): ``fake_quant_enabled`` (off: identity)
    and ``observer_enabled`` (off: scales frozen). The observer updates in
    training mode, and in eval mode only until it has seen a first tensor.
    """

    def __init__(
        self,
        bits: int = 8,
        scheme: Scheme = "symmetric",
        axis: int | None = None,
        channels: int | None = None,
        observer: ObserverKind = "minmax",
        learn_scale: bool = False,
        is_weight: bool = True,
        momentum: float = 0.01,
    ):
        super().__init__()
        qrange(bits, scheme)  # validates
        if (axis is None) != (channels is None):
            raise ValueError("give both axis and channels (per channel) or neither")
        self.bits, self.scheme, self.axis = bits, scheme, axis
        self.observer, self.learn_scale = observer, learn_scale
        self.is_weight, self.momentum = is_weight, momentum
        n = channels or 1
        self.register_buffer("min_val", torch.zeros(n))
        self.register_buffer("max_val", torch.zeros(n))
        if learn_scale:
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("observer_enabled", torch.tensor(True))

    def config(self) -> dict:
        """Constructor arguments (JSON-compatible)."""
        return {
            "bits": self.bits,
            "scheme": self.scheme,
            "axis": self.axis,
            "channels": None if self.axis is None else int(self.min_val.numel()),
            "observer": self.observer,
            "learn_scale": self.learn_scale,
            "is_weight": self.is_weight,
            "momentum": self.momentum,
        }

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range from ``x`` and recompute scale and zero point
        (a learned scale is only initialized, at the first observation). On the meta
        device (a layer built to check its shapes) there is nothing to observe."""
        if x.is_meta or self.observed.is_meta:
            return
        lo, hi = observed_range(x, self.axis)
        first = not bool(self.observed)
        if first or self.is_weight and self.observer == "minmax":
            new_lo, new_hi = lo, hi
        elif self.observer == "minmax":
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:
            m = self.momentum
            new_lo, new_hi = (
                self.min_val + m * (lo - self.min_val),
                self.max_val + m * (hi - self.max_val),
            )
        self.min_val.copy_(new_lo)
        self.max_val.copy_(new_hi)
        scale, zp = scale_zero_point(self.min_val, self.max_val, self.bits, self.scheme)
        if not self.learn_scale or first:
            self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.observed.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.observer_enabled) and (self.training or not bool(self.observed)):
            self.observe(x)
        return self.fake(x)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` on the current grid, without observing it."""
        if not bool(self.fake_quant_enabled):
            return x
        fq = lsq_fake_quantize if self.learn_scale else fake_quantize
        return fq(x, self.scale, self.zero_point, self.bits, self.scheme, self.axis)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integers of ``x`` on this quantizer's current grid."""
        return quantize(x, self.grid_scale(), self.zero_point, self.bits, self.scheme, self.axis)

    def grid_scale(self) -> torch.Tensor:
        """The scale forward uses (a learned scale's absolute value, at least eps)."""
        return self.scale.detach().abs().clamp_min(_EPS)

    def extra_repr(self) -> str:
        where = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        learned = ", learn_scale" if self.learn_scale else ""
        return f"bits={self.bits}, {self.scheme}, {where}, observer={self.observer}{learned}"


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every :class:`FakeQuantizer` in ``model``."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Turn fake quantization on or off in every quantizer of ``model``; returns how many."""
    qs = quantizers(model)
    for q in qs:
        q.fake_quant_enabled.fill_(enabled)
    return len(qs)


def set_observers(model: nn.Module, enabled: bool) -> int:
    """Let the observers of ``model`` update (``True``) or freeze their scales
    (``False``, e.g. late in QAT); returns how many quantizers were set."""
    qs = quantizers(model)
    for q in qs:
        q.observer_enabled.fill_(enabled)
    return len(qs)
