"""What ``TTLinear`` and ``TuckerLinear`` share: a Linear whose sizes are split in modes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tnsurgery.layers.base import SurgeryLayer

PATHS = ("auto", "contract", "dense")


class TensorizedLinear(SurgeryLayer):
    """Base of the Linear layers whose ``in``/``out`` sizes are factored into modes.

    ``in_features``/``out_features`` may be below the factors' products (the
    weight was zero-padded to factor well): the contraction path pads inputs
    and crops outputs. ``path`` is ``"auto"``, ``"contract"`` or ``"dense"``.
    """

    def _set_modes(
        self,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        path: str,
    ) -> None:
        """Check and keep the sizes, their factors and the forward path."""
        if math.prod(in_factors) < in_features or math.prod(out_factors) < out_features:
            raise ValueError("the factors' products must cover in_features and out_features")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}")
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors = tuple(in_factors), tuple(out_factors)
        self.path = path

    @property
    def in_padded(self) -> int:
        """The product of the input factors (``>= in_features``)."""
        return math.prod(self.in_factors)

    @property
    def out_padded(self) -> int:
        """The product of the output factors (``>= out_features``)."""
        return math.prod(self.out_factors)

    def _rows_forward(
        self, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``run`` on the input as rows ``(n, in_features)``, reshaped back."""
        lead = x.shape[:-1]
        return run(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def _dense_rows(self, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One matmul with the (rebuilt) dense weight, bias included."""
        return F.linear(x2, weight, self.bias)

    def _contracted_rows(
        self, x2: torch.Tensor, contract: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``contract`` on the zero-padded rows, cropped to ``out_features``, plus bias."""
        if self.in_padded > self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        y = contract(x2)[:, : self.out_features]
        return y + self.bias if self.bias is not None else y
