"""Statistics of a layer's inputs on calibration data, as transforms receive them
(``Context.input_stats``, and the ``stats`` of ``Transform.refit``): plain tensors,
so that transforms and decompositions need nothing of the calibration pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    """``gram = Σ x xᵀ`` (float64, on the CPU) over ``rows`` input rows of one layer."""

    gram: torch.Tensor
    rows: int

    def second_moment(self, damping: float = 0.0) -> torch.Tensor:
        """``G / rows + damping · mean(diag) · I``: the (damped) input second moment."""
        c = self.gram / max(self.rows, 1)
        if damping:
            mean_diag = float(torch.diagonal(c).mean())
            c = c + torch.eye(c.shape[0], dtype=c.dtype) * (damping * max(mean_diag, 1e-30))
        return c


@dataclass
class CrossStats:
    """What a refit needs, summed over ``rows`` (non-padding) input rows:
    ``gram = X_cᵀ X_c`` (the surgered model's inputs to the layer), ``cross = X_cᵀ X_o``
    and ``gram_original = X_oᵀ X_o`` (the original model's inputs), float64."""

    gram: torch.Tensor
    cross: torch.Tensor
    gram_original: torch.Tensor | None
    rows: int
