"""Sizes and FLOPs of a module's call, from its input shape alone (no run): the
common ground of tracing, the layers' own ``flops`` and the transforms' plans."""

from __future__ import annotations

import torch
from torch import nn

from tnsurgery.decompositions.conv1d import is_conv1d

__all__ = ["conv2d_output_hw", "module_flops"]


def conv2d_output_hw(conv: nn.Conv2d, hw: tuple[int, int] | torch.Size) -> tuple[int, int]:
    """Spatial output size of ``conv`` on an input of spatial size ``hw``."""
    out = []
    for i in range(2):
        size = int(hw[i])
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if isinstance(conv.padding, str):
            out.append(size if conv.padding == "same" else (size - d * (k - 1) - 1) // s + 1)
        else:
            p = conv.padding[i]
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def module_flops(module: nn.Module, input_shape: tuple[int, ...] | None) -> int | None:
    """FLOPs (2 per multiply-add) of one call; a Linear without shape counts one row."""
    if hasattr(module, "flops") and callable(module.flops):
        if input_shape is None and hasattr(module, "in_features"):
            input_shape = (1, module.in_features)
        return module.flops(input_shape) if input_shape is not None else None
    if isinstance(module, nn.Linear):
        rows = 1
        for d in (input_shape or (1, module.in_features))[:-1]:
            rows *= int(d)
        return 2 * rows * module.in_features * module.out_features
    if is_conv1d(module):  # GPT-2's Conv1D: weight (in, out)
        fin, fout = module.weight.shape
        rows = 1
        for d in (input_shape or (1, fin))[:-1]:
            rows *= int(d)
        return 2 * rows * int(fin) * int(fout)
    if isinstance(module, nn.Conv2d) and input_shape is not None:
        n = input_shape[0] if len(input_shape) == 4 else 1
        h, w = conv2d_output_hw(module, input_shape[-2:])
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        return 2 * n * h * w * module.out_channels * per_out
    return None
