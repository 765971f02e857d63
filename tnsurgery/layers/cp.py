"""``CPConv2d``: a Conv2d whose kernel is a rank-``R`` CP tensor (Lebedev et al. 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tnsurgery.flops import conv2d_output_hw
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.lowrank import ConvAttributes


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class CPConv2d(ConvAttributes, SurgeryLayer):
    """Four thin convs whose composition is a conv with a rank-``R`` CP kernel.

    ``W[o, i, h, w] = Σ_r U_out[o, r] · U_in[i, r] · U_h[h, r] · U_w[w, r]`` becomes

    1. ``first``: 1×1 conv ``in_channels -> R`` (weight ``U_inᵀ``), no bias;
    2. ``vertical``: ``kh×1`` depthwise conv on the R channels (``U_h``), with the
       row half of the stride, padding and dilation;
    3. ``horizontal``: ``1×kw`` depthwise conv (``U_w``), with the column half;
    4. ``last``: 1×1 conv ``R -> out_channels`` (``U_out``), with the bias.

    The split is exact for every padding mode: padding rows or columns only copies
    (or zero-fills) whole pixels, which commutes with the pointwise ``first`` conv and
    with a conv along the other axis. Only ``groups=1`` convolutions are represented.
    The replaced conv's attributes are readable
    (:class:`~tnsurgery.layers.lowrank.ConvAttributes`; the geometry is split
    between ``vertical`` and ``horizontal``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int] | int,
        rank: int,
        stride: tuple[int, int] | int = (1, 1),
        padding: tuple[int, int] | int | str = (0, 0),
        dilation: tuple[int, int] | int = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        kh, kwid = _pair(kernel_size)
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            pad_v = pad_h = padding  # "same"/"valid" mean the same thing per axis
        else:
            ph, pw = _pair(padding)
            pad_v, pad_h = (ph, 0), (0, pw)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kwid)
        self.rank = rank
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, **kw)
        self.vertical = nn.Conv2d(
            rank,
            rank,
            (kh, 1),
            stride=(sh, 1),
            padding=pad_v,
            dilation=(dh, 1),
            groups=rank,
            padding_mode=padding_mode,
            bias=False,
            **kw,
        )
        self.horizontal = nn.Conv2d(
            rank,
            rank,
            (1, kwid),
            stride=(1, sw),
            padding=pad_h,
            dilation=(1, dw),
            groups=rank,
            padding_mode=padding_mode,
            bias=False,
            **kw,
        )
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    # ------------------------------------------------------------------ geometry
    @property
    def output_conv(self) -> nn.Conv2d:
        return self.last

    @property
    def stride(self) -> tuple[int, int]:
        return (self.vertical.stride[0], self.horizontal.stride[1])

    @property
    def dilation(self) -> tuple[int, int]:
        return (self.vertical.dilation[0], self.horizontal.dilation[1])

    @property
    def padding(self) -> tuple[int, int] | str:
        """The padding of the conv this layer replaces (a string stays a string)."""
        if isinstance(self.vertical.padding, str):
            return self.vertical.padding
        return (self.vertical.padding[0], self.horizontal.padding[1])

    @property
    def padding_mode(self) -> str:
        return self.vertical.padding_mode

    # ------------------------------------------------------------------ building
    @classmethod
    def from_factors(
        cls,
        conv: nn.Conv2d,
        out_factor: torch.Tensor,
        in_factor: torch.Tensor,
        h_factor: torch.Tensor,
        w_factor: torch.Tensor,
    ) -> CPConv2d:
        """Build from the conv it replaces and the CP factors of its kernel, ``(out, R)``,
        ``(in, R)``, ``(kh, R)``, ``(kw, R)``, the term weights already absorbed (their
        dtype and device); the bias is ``conv``'s."""
        rank = out_factor.shape[1]
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            device="meta",  # no random init to overwrite
            dtype=out_factor.dtype,
        ).to_empty(device=out_factor.device)
        with torch.no_grad():
            layer.first.weight.copy_(in_factor.mT.reshape(layer.first.weight.shape))
            layer.vertical.weight.copy_(h_factor.mT.reshape(layer.vertical.weight.shape))
            layer.horizontal.weight.copy_(w_factor.mT.reshape(layer.horizontal.weight.shape))
            layer.last.weight.copy_(out_factor.reshape(layer.last.weight.shape))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CP factors ``(out, R)``, ``(in, R)``, ``(kh, R)``, ``(kw, R)`` (views)."""
        # (.t(), not .mT: the TorchScript ONNX exporter has no aten::mT, and a model that
        # reads ``weight`` while exported runs to_dense() in the trace)
        r = self.rank
        return (
            self.last.weight.reshape(self.out_channels, r),
            self.first.weight.reshape(r, self.in_channels).t(),
            self.vertical.weight.reshape(r, self.kernel_size[0]).t(),
            self.horizontal.weight.reshape(r, self.kernel_size[1]).t(),
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("or,ir,hr,wr->oihw", *self.factors())

    def flops(self, input_shape: tuple[int, ...]) -> int:
        n = input_shape[0] if len(input_shape) == 4 else 1
        h_in, w_in = int(input_shape[-2]), int(input_shape[-1])
        h_mid, _ = conv2d_output_hw(self.vertical, (h_in, w_in))
        h_out, w_out = conv2d_output_hw(self.horizontal, (h_mid, w_in))
        kh, kw = self.kernel_size
        r = self.rank
        return (
            2
            * n
            * (
                h_in * w_in * self.in_channels * r  # 1x1 in -> R, on the whole input
                + h_mid * w_in * r * kh  # kh x 1 depthwise
                + h_out * w_out * r * kw  # 1 x kw depthwise
                + h_out * w_out * r * self.out_channels  # 1x1 R -> out
            )
        )

    def config(self) -> dict[str, Any]:
        padding = self.padding
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": self.rank,
            "stride": list(self.stride),
            "padding": padding if isinstance(padding, str) else list(padding),
            "dilation": list(self.dilation),
            "padding_mode": self.padding_mode,
            "bias": self.last.bias is not None,
        }

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        dense = self.out_channels * self.in_channels * kh * kw
        kept = weight_params(self.in_channels, self.out_channels, self.kernel_size, self.rank)
        return (
            f"{self.in_channels}->{self.rank}->{self.out_channels}, kernel={kh}x{kw}, "
            f"rank={self.rank}, weight params {kept}/{dense} ({kept / dense:.1%})"
        )


def weight_params(in_channels: int, out_channels: int, kernel_size, rank: int) -> int:
    """Weight parameters (bias excluded) of a rank-``rank`` :class:`CPConv2d`."""
    kh, kw = _pair(kernel_size)
    return rank * (in_channels + out_channels + kh + kw)
