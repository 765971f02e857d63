"""The contract every replacement layer follows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SurgeryLayer(nn.Module):
    """Base class of the layers surgery puts in a model.

    A layer must be rebuildable from JSON alone (``config()`` /
    ``from_config()``) so that :func:`tnsurgery.load` never unpickles
    anything: the manifest stores the config, the safetensors file the
    weights.
    """

    def to_dense(self) -> torch.Tensor:
        """The dense weight of the layer this one replaced, rebuilt from the factors."""
        raise NotImplementedError

    def param_count(self) -> int:
        """Number of parameters (weights and bias)."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs (2 per multiply-add, bias excluded) of one call on an input of this shape."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-compatible constructor arguments: ``type(self).from_config(self.config())``
        rebuilds an identical layer (weights aside)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], current: nn.Module | None = None) -> SurgeryLayer:
        """Build an empty layer from ``config``; ``current`` is the module now at the
        target's place (useful to wrappers); its weights are loaded afterwards."""
        return cls(**config)
