"""Low-rank replacements for ``nn.Linear`` and ``nn.Conv2d``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.flops import conv2d_output_hw
from tnsurgery.layers.base import SurgeryLayer


def _rows(input_shape: tuple[int, ...]) -> int:
    n = 1
    for d in input_shape[:-1]:
        n *= int(d)
    return n


class LowRankLinear(SurgeryLayer):
    """``y = x @ V @ Uᵀ + b``: two thin matmuls through rank ``r``, never the dense weight.

    Shapes: ``v`` is ``(rank, in_features)``, ``u`` is ``(out_features, rank)``,
    so ``u @ v`` is the dense weight it replaces.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for training from scratch, scaled so ``u @ v`` has the variance of
        a Kaiming-uniform dense weight (surgery overwrites it with the trained factors)."""
        if self.v.is_meta:  # built to be filled (from_factors): nothing to draw
            return
        with torch.no_grad():
            nn.init.normal_(self.v, std=(1.0 / self.in_features) ** 0.5)
            nn.init.normal_(self.u, std=(1.0 / (3 * self.rank)) ** 0.5)
            if self.bias is not None:
                self.bias.zero_()

    @classmethod
    def from_factors(
        cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> LowRankLinear:
        """Build from ``u (out, r)``, ``v (r, in)`` and an optional bias (their dtype/device)."""
        # built on the meta device: no random init (and no global RNG draw) to overwrite
        layer = cls(v.shape[1], u.shape[0], v.shape[0], bias is not None, "meta", u.dtype)
        layer = layer.to_empty(device=u.device)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def truncate_(self, rank: int) -> LowRankLinear:
        """Lower the rank in place to the best rank-``rank`` approximation of ``u @ v``
        (progressive-rank schedules). ``u``/``v`` become new Parameters: rebuild the
        optimizer after."""
        rank = max(1, min(int(rank), self.rank))
        with torch.no_grad():
            u, v = self.u.detach().double(), self.v.detach().double()
            qu, ru = torch.linalg.qr(u)  # u @ v = qu (ru rvᵀ) qvᵀ, small core in the middle
            qv, rv = torch.linalg.qr(v.mT)
            a, s, bt = torch.linalg.svd(ru @ rv.mT)
            root = s[:rank].sqrt()
            new_u = (qu @ a[:, :rank]) * root
            new_v = root[:, None] * (bt[:rank] @ qv.mT)
        dtype = self.u.dtype
        self.u = nn.Parameter(new_u.to(dtype).contiguous())
        self.v = nn.Parameter(new_v.to(dtype).contiguous())
        self.rank = rank
        return self

    def cuttable_ranks(self) -> tuple[int, ...]:
        """``(rank,)``: progressive rank cuts it with :meth:`truncate_`."""
        return (self.rank,)

    def cut_ranks_(self, ranks: Sequence[int]) -> None:
        """:meth:`truncate_` to ``ranks[0]``."""
        (rank,) = ranks
        self.truncate_(rank)

    def to_dense(self) -> torch.Tensor:
        return self.u @ self.v

    def flops(self, input_shape: tuple[int, ...]) -> int:
        return 2 * _rows(input_shape) * self.rank * (self.in_features + self.out_features)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        kept = self.rank * (self.in_features + self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, "
            f"weight params {kept}/{dense} ({kept / dense:.1%})"
        )


def geometry_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    padding_mode: str,
    **kw: Any,
) -> nn.Conv2d:
    """The bias-free k×k conv of a decomposed conv block: it carries the replaced
    conv's kernel size, stride, padding, dilation and padding mode, so the block's
    output has the original shape."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        tuple(kernel_size),
        stride=tuple(stride),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(dilation),
        padding_mode=padding_mode,
        bias=False,
        **kw,
    )


class ConvAttributes:
    """The attributes of the ``nn.Conv2d`` a conv block replaced, for model code that
    reads them (``in_channels``, ``out_channels`` and ``kernel_size`` are the
    block's own): ``stride``, ``padding``, ``dilation`` and ``padding_mode`` from
    :attr:`geometry_conv` (the conv of the block that carries them), ``bias``
    from :attr:`output_conv` (the same Parameter: not a copy), ``groups`` 1 (the
    only convolutions decomposed), and ``weight`` from the
    :class:`~tnsurgery.layer.SurgeryLayer` contract. Read-only: the block's
    convs hold the values, ``config()`` records them."""

    groups = 1
    transposed = False
    output_padding = (0, 0)
    # (TorchScript compiles a module's properties: these stay in Python)
    __jit_unused_properties__ = [
        "weight", "geometry_conv", "output_conv", "stride", "padding", "dilation",
        "padding_mode", "bias",
    ]  # fmt: skip

    # what a subclass provides (as properties): the conv of the block that carries the
    # replaced conv's stride, padding and dilation (or it overrides those), and the
    # conv that holds the bias
    geometry_conv: nn.Conv2d
    output_conv: nn.Conv2d

    @property
    def stride(self) -> tuple[int, int]:
        return tuple(self.geometry_conv.stride)

    @property
    def padding(self) -> tuple[int, int] | str:
        """The replaced conv's padding (a string stays a string)."""
        padding = self.geometry_conv.padding
        return padding if isinstance(padding, str) else tuple(padding)

    @property
    def dilation(self) -> tuple[int, int]:
        return tuple(self.geometry_conv.dilation)

    @property
    def padding_mode(self) -> str:
        return self.geometry_conv.padding_mode

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias (the output conv's parameter itself), or ``None``."""
        return self.output_conv.bias


class LowRankConv2d(ConvAttributes, SurgeryLayer):
    """A k×k conv into ``rank`` channels, then a 1×1 conv to ``out_channels`` (with the bias).

    Stride, padding, dilation and padding mode stay on the first conv, so the
    output has the original shape; only ``groups=1`` convolutions are factorized.
    The replaced conv's attributes are readable (:class:`ConvAttributes`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        rank: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.rank = rank
        self.first = geometry_conv(
            in_channels, rank, kernel_size, stride, padding, dilation, padding_mode, **kw
        )
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    @property
    def geometry_conv(self) -> nn.Conv2d:
        return self.first

    @property
    def output_conv(self) -> nn.Conv2d:
        return self.second

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, u: torch.Tensor, v: torch.Tensor) -> LowRankConv2d:
        """Build from the conv it replaces and the factors of its ``(out, in·kh·kw)`` weight."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            v.shape[0],
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            device="meta",
            dtype=u.dtype,
        ).to_empty(device=u.device)
        with torch.no_grad():
            layer.first.weight.copy_(v.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(u.reshape(layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def to_dense(self) -> torch.Tensor:
        u = self.second.weight.reshape(self.out_channels, self.rank)
        v = self.first.weight.reshape(self.rank, -1)
        return (u @ v).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        n = input_shape[0] if len(input_shape) == 4 else 1
        h, w = conv2d_output_hw(self.first, input_shape[-2:])
        kh, kw = self.kernel_size
        per_pixel = self.rank * (self.in_channels * kh * kw + self.out_channels)
        return 2 * n * h * w * per_pixel

    def config(self) -> dict[str, Any]:
        c = self.first
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": self.rank,
            "stride": list(c.stride),
            "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
            "dilation": list(c.dilation),
            "padding_mode": c.padding_mode,
            "bias": self.second.bias is not None,
        }

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        dense = self.out_channels * self.in_channels * kh * kw
        kept = self.rank * (self.in_channels * kh * kw + self.out_channels)
        return (
            f"{self.in_channels}->{self.rank}->{self.out_channels}, kernel={kh}x{kw}, "
            f"rank={self.rank}, weight params {kept}/{dense} ({kept / dense:.1%})"
        )
