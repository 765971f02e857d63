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

    def quant_axes(self) -> dict[str, int]:
        """The parameters a ``qat`` wrapper quantizes, each with its channel axis for
        per-channel scales: by default every parameter of 2 or more dimensions
        (the bias stays in float), along axis 0. Layers override this where
        another axis is the natural channel (TT cores: their rank axis)."""
        return {n: 0 for n, p in self.named_parameters() if p.dim() >= 2}

    def cached_dense(self, params: list[torch.Tensor]) -> torch.Tensor:
        """``to_dense()``, cached in inference until one of ``params`` changes.

        With gradients enabled (training) or under ``torch.compile`` the weight
        is rebuilt each call, so autograd and the compiler see the factors.
        """
        return self.cached_value("dense", params, self.to_dense)

    def reuses_weights(self, params: list[torch.Tensor]) -> bool:
        """Whether tensors derived from ``params`` can be cached across calls now:
        in eager inference (no gradient wanted), not under ``torch.compile``."""
        if self.__dict__.get("_no_weight_cache") or torch.compiler.is_compiling():
            return False  # (a wrapper passes new tensors each call: never cache them)
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def cached_value(self, name: Any, params: list[torch.Tensor], build) -> Any:
        """``build()``, cached under ``name`` in inference until one of ``params``
        changes (their version counter, storage, dtype or device); rebuilt each call
        when gradients are wanted or under ``torch.compile``."""
        if not self.reuses_weights(params):
            return build()
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        caches = self.__dict__.setdefault("_weight_cache", {})
        hit = caches.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, build())
            caches[name] = hit
        return hit[1]

    def has_dense_cache(self) -> bool:
        """Whether a rebuilt dense weight is cached (the dense path is then a plain matmul)."""
        return "dense" in self.__dict__.get("_weight_cache", {})

    def clear_dense_cache(self) -> None:
        """Drop every cached rebuilt weight (after changing the factors' shapes)."""
        self.__dict__.pop("_weight_cache", None)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_weight_cache", None)  # never pickled
        return state

    @classmethod
    def from_config(cls, config: dict[str, Any], current: nn.Module | None = None) -> SurgeryLayer:
        """Build an empty layer from ``config``; ``current`` is the module now at the
        target's place (useful to wrappers); its weights are loaded afterwards."""
        return cls(**config)
