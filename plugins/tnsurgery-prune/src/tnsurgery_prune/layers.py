"""The layers ``prune`` puts in a model: a dense weight times a fixed 0/1 mask.

The weight stays a dense ``nn.Parameter`` (pruned entries set to zero) and the
mask is a boolean buffer saved with the weights. Forward uses
``weight * mask``, so the gradient of every pruned entry is zero and pruned
weights stay zero through fine-tuning, whatever the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.lowrank import conv2d_output_hw


class _Pruned(SurgeryLayer):
    """What both pruned layers share: ``weight``, ``bias`` and the ``mask`` buffer."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    mask: torch.Tensor

    def _init(self, shape: tuple[int, ...], fan_in: int, bias: bool, device, dtype) -> None:
        # nn.Linear / nn.Conv2d's own init, for a layer built from config alone
        # (tnsurgery.load overwrites it with the saved weights and mask).
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype)) if bias else None
        )
        self.register_buffer("mask", torch.ones(shape, device=device, dtype=torch.bool))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_dense(self, module: nn.Module, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.mask.copy_(mask)
            self.weight.copy_(module.weight * mask)
            if self.bias is not None:
                self.bias.copy_(module.bias)

    @property
    def kept(self) -> int:
        """Number of weights kept (mask entries that are ``True``)."""
        return int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of the weights that are pruned."""
        return 1.0 - self.kept / self.mask.numel()

    def to_dense(self) -> torch.Tensor:
        """The effective weight: ``weight * mask``, the shape of the layer it replaced."""
        return self.weight * self.mask

    def param_count(self) -> int:
        """Kept weights plus the bias.

        Pruned entries are not counted although the dense tensor still stores
        them: the count is what a sparse format needs to hold, and the number
        of weights that can still change when training. A kept weight that
        happens to be zero is counted.
        """
        bias = self.bias.numel() if self.bias is not None else 0
        return self.kept + bias

    def _sparsity_repr(self) -> str:
        return f"sparsity={self.sparsity:.3f} (kept {self.kept}/{self.mask.numel()} weights)"


class PrunedLinear(_Pruned):
    """``y = x @ (weight * mask)ᵀ + b``: an ``nn.Linear`` whose pruned weights stay zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init((out_features, in_features), in_features, bias, device, dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor) -> PrunedLinear:
        """Build from the trained ``linear`` and a boolean ``mask`` of its weight's shape
        (``True`` = kept), keeping its dtype and device."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype
        )
        layer._load_dense(linear, mask)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """2 FLOPs per kept weight per input row (pruned weights cost nothing)."""
        rows = 1
        for d in input_shape[:-1]:
            rows *= int(d)
        return 2 * rows * self.kept

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._sparsity_repr()}"
        )


class PrunedConv2d(_Pruned):
    """An ``nn.Conv2d`` (``padding_mode='zeros'``) computed with ``weight * mask``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        kh, kw = self.kernel_size
        shape = (out_channels, in_channels // groups, kh, kw)
        self._init(shape, (in_channels // groups) * kh * kw, bias, device, dtype)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor) -> PrunedConv2d:
        """Build from the trained ``conv`` and a boolean ``mask`` of its weight's shape."""
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        layer._load_dense(conv, mask)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self.weight * self.mask,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """2 FLOPs per kept weight per output pixel."""
        n = input_shape[0] if len(input_shape) == 4 else 1
        h, w = conv2d_output_hw(self, input_shape[-2:])
        return 2 * n * h * w * self.kept

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"bias={self.bias is not None}, {self._sparsity_repr()}"
        )
