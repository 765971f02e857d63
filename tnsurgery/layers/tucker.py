"""Tucker replacements: ``TuckerConv2d`` (Tucker-2 kernel) and ``TuckerLinear`` (Tucker
of the tensorized weight)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tnsurgery.decompositions.tucker import tucker_to_full
from tnsurgery.flops import conv2d_output_hw
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.lowrank import ConvAttributes, geometry_conv
from tnsurgery.layers.tensorized import TensorizedLinear


class TuckerConv2d(ConvAttributes, SurgeryLayer):
    """Tucker-2 convolution (Kim et al. 2016): a 1×1 conv to ``r_in`` channels, the k×k
    core conv to ``r_out`` channels, a 1×1 conv to ``out_channels`` (with the bias).

    The kernel is ``W = G ×_out U_out ×_in U_in``: ``first`` holds ``U_inᵀ``,
    ``core`` holds ``G (r_out, r_in, kh, kw)``, ``last`` holds ``U_out``.
    Stride, padding, dilation and padding mode sit on the core conv; the
    first 1×1 conv has no bias, so it commutes with any padding and the
    output equals the dense conv's. Only ``groups=1`` convolutions. The replaced
    conv's attributes are readable (:class:`~tnsurgery.layers.lowrank.ConvAttributes`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        ranks: Sequence[int],
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] | str = (0, 0),
        dilation: Sequence[int] = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        r_out, r_in = (int(r) for r in ranks)
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.ranks = (r_out, r_in)
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False, **kw)
        self.core = geometry_conv(
            r_in, r_out, self.kernel_size, stride, padding, dilation, padding_mode, **kw
        )
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias, **kw)

    @property
    def geometry_conv(self) -> nn.Conv2d:
        return self.core

    @property
    def output_conv(self) -> nn.Conv2d:
        return self.last

    @classmethod
    def from_tucker(
        cls, conv: nn.Conv2d, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
    ) -> TuckerConv2d:
        """Build from the conv it replaces and the Tucker-2 of its kernel: ``core (r_out,
        r_in, kh, kw)``, ``u_out (out, r_out)``, ``u_in (in, r_in)`` (their dtype/device)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            (core.shape[0], core.shape[1]),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            device="meta",
            dtype=core.dtype,
        ).to_empty(device=core.device)
        with torch.no_grad():
            layer.first.weight.copy_(u_in.mT.reshape(layer.first.weight.shape))
            layer.core.weight.copy_(core)
            layer.last.weight.copy_(u_out.reshape(layer.last.weight.shape))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def to_dense(self) -> torch.Tensor:
        r_out, r_in = self.ranks
        u_out = self.last.weight.reshape(self.out_channels, r_out)
        u_in_t = self.first.weight.reshape(r_in, self.in_channels)
        return torch.einsum("oa,abhw,bi->oihw", u_out, self.core.weight, u_in_t)

    def weight_params(self) -> int:
        """Parameters of the three kernels (bias excluded)."""
        r_out, r_in = self.ranks
        kh, kw = self.kernel_size
        return self.in_channels * r_in + r_out * r_in * kh * kw + r_out * self.out_channels

    def flops(self, input_shape: tuple[int, ...]) -> int:
        # the first 1×1 conv runs at the input's resolution, the others at the output's
        n = input_shape[0] if len(input_shape) == 4 else 1
        h_in, w_in = int(input_shape[-2]), int(input_shape[-1])
        h, w = conv2d_output_hw(self.core, (h_in, w_in))
        r_out, r_in = self.ranks
        kh, kw = self.kernel_size
        first = self.in_channels * r_in * h_in * w_in
        rest = (r_in * r_out * kh * kw + r_out * self.out_channels) * h * w
        return 2 * n * (first + rest)

    def config(self) -> dict[str, Any]:
        c = self.core
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "ranks": list(self.ranks),
            "stride": list(c.stride),
            "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
            "dilation": list(c.dilation),
            "padding_mode": c.padding_mode,
            "bias": self.last.bias is not None,
        }

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        r_out, r_in = self.ranks
        dense = self.out_channels * self.in_channels * kh * kw
        kept = self.weight_params()
        return (
            f"{self.in_channels}->{r_in}->{r_out}->{self.out_channels}, kernel={kh}x{kw}, "
            f"ranks [r_out, r_in]=[{r_out}, {r_in}], "
            f"weight params {kept}/{dense} ({kept / dense:.1%})"
        )


class TuckerLinear(TensorizedLinear):
    """``y = x Wᵀ + b`` with ``W`` tensorized as ``(m_1..m_d, n_1..n_d)`` (output modes,
    then input modes: a plain reshape of the ``(out, in)`` matrix) and held in Tucker
    form: ``core (ro_1..ro_d, ri_1..ri_d)``, ``out_proj[k] (m_k, ro_k)``,
    ``in_proj[k] (n_k, ri_k)``.

    Keeping the output and input modes apart makes the forward three small
    steps, none of which rebuilds ``W``: project the input's modes one by one
    (``n_k -> ri_k``), one matmul with the core as a ``(∏ro, ∏ri)`` matrix,
    then expand the output's modes (``ro_k -> m_k``). As in ``TTLinear``,
    ``path="auto"`` picks per call the cheaper by FLOPs of that and rebuilding
    the dense weight (cached in inference until a parameter changes);
    ``in_features``/``out_features`` may be below the factors' products (the
    weight was zero-padded): inputs are padded, outputs cropped.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        d = len(in_factors)
        if len(out_factors) != d or len(ranks) != 2 * d:
            raise ValueError("need d in_factors, d out_factors and 2d ranks (out modes, then in)")
        self._set_modes(in_features, out_features, in_factors, out_factors, path)
        kw = {"device": device, "dtype": dtype}
        ro, ri = [int(r) for r in ranks[:d]], [int(r) for r in ranks[d:]]
        self.core = nn.Parameter(torch.empty(*ro, *ri, **kw))
        self.out_proj = nn.ParameterList(
            nn.Parameter(torch.empty(m, r, **kw)) for m, r in zip(out_factors, ro, strict=True)
        )
        self.in_proj = nn.ParameterList(
            nn.Parameter(torch.empty(n, r, **kw)) for n, r in zip(in_factors, ri, strict=True)
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if not (device is not None and torch.device(device).type == "meta"):
            self.reset_parameters()

    # ------------------------------------------------------------------ shape
    @property
    def d(self) -> int:
        return len(self.in_factors)

    @property
    def ranks(self) -> list[int]:
        """Multilinear ranks: the output modes', then the input modes'."""
        return list(self.core.shape)

    def weight_params(self) -> int:
        """Parameters of the core and the factor matrices (bias excluded)."""
        return self.core.numel() + sum(p.numel() for p in (*self.out_proj, *self.in_proj))

    # -------------------------------------------------------------- building
    @classmethod
    def from_tucker(
        cls,
        core: torch.Tensor,
        out_proj: Sequence[torch.Tensor],
        in_proj: Sequence[torch.Tensor],
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        path: str = "auto",
    ) -> TuckerLinear:
        """Build from a Tucker decomposition of the ``(m.., n..)`` weight tensor: ``core``
        and the factor matrices ``(m_k, ro_k)`` / ``(n_k, ri_k)`` (their dtype/device)."""
        layer = cls(
            in_features,
            out_features,
            [u.shape[0] for u in in_proj],
            [u.shape[0] for u in out_proj],
            list(core.shape),
            bias is not None,
            path,
            device="meta",
            dtype=core.dtype,
        ).to_empty(device=core.device)
        with torch.no_grad():
            layer.core.copy_(core)
            for p, u in zip([*layer.out_proj, *layer.in_proj], [*out_proj, *in_proj], strict=True):
                p.copy_(u)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def reset_parameters(self) -> None:
        """Init for training from scratch: orthonormal factor matrices and a Gaussian core
        scaled so ``W`` has the variance of a Kaiming-uniform dense weight."""
        with torch.no_grad():
            for u in (*self.out_proj, *self.in_proj):
                mat = torch.empty(u.shape, dtype=torch.float32)
                nn.init.orthogonal_(mat)
                u.copy_(mat)
            # orthonormal columns preserve norms: ‖W‖ = ‖G‖, so set ‖G‖² = E‖W‖²
            std = math.sqrt(self.out_padded * self.in_padded / (3 * self.in_features))
            self.core.normal_(0.0, std / math.sqrt(self.core.numel()))
            if self.bias is not None:
                self.bias.zero_()
        self.clear_dense_cache()

    # --------------------------------------------------------------- forward
    def to_dense(self) -> torch.Tensor:
        w = tucker_to_full(self.core, [*self.out_proj, *self.in_proj])
        w = w.reshape(self.out_padded, self.in_padded)
        return w[: self.out_features, : self.in_features]

    def contraction_flops(self, rows: int) -> int:
        """FLOPs of the contracting forward on ``rows`` inputs."""
        d = self.d
        ro, ri = self.ranks[:d], self.ranks[d:]
        n, m = self.in_factors, self.out_factors
        total = 0
        for k in range(d):  # input modes n_k -> ri_k, in order
            total += math.prod(ri[:k]) * n[k] * ri[k] * math.prod(n[k + 1 :])
        total += math.prod(ri) * math.prod(ro)
        for k in range(d):  # output modes ro_k -> m_k, in order
            total += math.prod(m[:k]) * ro[k] * m[k] * math.prod(ro[k + 1 :])
        return 2 * rows * total

    def rebuild_flops(self) -> int:
        """FLOPs of rebuilding the dense weight (mode products, in mode order)."""
        shape = self.ranks
        total = 0
        for k, size in enumerate([*self.out_factors, *self.in_factors]):
            total += 2 * math.prod(shape) * size
            shape[k] = size
        return total

    def choose_path(self, rows: int, cached: bool = False) -> str:
        """``"dense"`` or ``"contract"``: the cheaper for ``rows`` inputs (``cached``: the
        dense weight is already built)."""
        if self.path != "auto":
            return self.path
        rebuild = 0 if cached else self.rebuild_flops()
        dense = rebuild + 2 * rows * self.in_features * self.out_features
        return "dense" if dense < self.contraction_flops(rows) else "contract"

    def _contract(self, x: torch.Tensor) -> torch.Tensor:
        # (.t(), not .mT: the TorchScript ONNX exporter has no aten::mT)
        b = x.shape[0]
        size = self.in_padded
        t = x
        # each step moves the mode it projects to the end: after d steps, (ri_1..ri_d)
        for n, u in zip(self.in_factors, self.in_proj, strict=True):
            size //= n
            t = t.reshape(b, n, size).transpose(1, 2) @ u  # (b, rest, r)
            size *= u.shape[1]
        d = self.d
        t = t.reshape(b, size) @ self.core.reshape(math.prod(self.ranks[:d]), size).t()
        size = t.shape[1]
        for m, u in zip(self.out_factors, self.out_proj, strict=True):
            r = u.shape[1]
            size //= r
            t = t.reshape(b, r, size).transpose(1, 2) @ u.t()  # (b, rest, m)
            size *= m
        return t.reshape(b, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows_forward(x, self._forward_rows)

    def _forward_rows(self, x2: torch.Tensor) -> torch.Tensor:
        cached = self.has_dense_cache() and not torch.is_grad_enabled()
        if self.choose_path(x2.shape[0], cached) == "dense":
            weight = self.cached_dense([self.core, *self.out_proj, *self.in_proj])
            return self._dense_rows(x2, weight)
        return self._contracted_rows(x2, self._contract)

    # ------------------------------------------------------------ reporting
    def flops(self, input_shape: tuple[int, ...]) -> int:
        rows = math.prod(int(s) for s in input_shape[:-1])
        if self.choose_path(rows, cached=True) == "dense":
            return 2 * rows * self.in_features * self.out_features
        return self.contraction_flops(rows)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_factors": list(self.in_factors),
            "out_factors": list(self.out_factors),
            "ranks": self.ranks,
            "bias": self.bias is not None,
            "path": self.path,
        }

    def quant_axes(self) -> dict[str, int]:
        """The core per slice of its first output mode; each factor per column (one
        scale per basis vector)."""
        axes = {"core": 0}
        axes.update({f"out_proj.{k}": 1 for k in range(len(self.out_proj))})
        axes.update({f"in_proj.{k}": 1 for k in range(len(self.in_proj))})
        return axes

    def extra_repr(self) -> str:
        d = self.d
        dense = self.in_features * self.out_features
        kept = self.weight_params()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"out modes={list(self.out_factors)} ranks={self.ranks[:d]}, "
            f"in modes={list(self.in_factors)} ranks={self.ranks[d:]}, path={self.path}, "
            f"weight params {kept}/{dense} ({kept / dense:.1%})"
        )
