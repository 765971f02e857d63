"""The contract every replacement layer follows: :class:`SurgeryLayer`.

It sits beside the layers, not among them, so that the pipeline (which selects and
trains layers through this contract) never imports a layer; the layers themselves
(:mod:`tnsurgery.layers`) and plugins' layers derive from it (also importable as
``tnsurgery.layers.base.SurgeryLayer``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class SurgeryLayer(nn.Module):
    """Base class of the layers surgery puts in a model.

    A layer must be rebuildable from JSON alone (``config()`` /
    ``from_config()``) so that :func:`tnsurgery.load` never unpickles
    anything: the manifest stores the config, the safetensors file the
    weights.

    What a plugin layer implements:

    - required: ``forward``, ``config()`` (and ``from_config()`` when the
      constructor does not take the config as keyword arguments), ``flops()``;
    - ``to_dense()`` where the layer computes a dense op (Linear, Conv2d) with
      a weight it can rebuild;
    - optional, with defaults that fit most layers: ``param_count()``,
      ``quant_axes()`` (what a ``qat`` wrapper quantizes);
    - optional training hooks, called by the training loop on every
      ``SurgeryLayer`` of the model, so training never names a concrete
      layer class: :meth:`cuttable_ranks` / :meth:`cut_ranks_` (progressive
      rank) and :meth:`clip_norms_`, :meth:`balance_norms_`,
      :meth:`reorthogonalize_`, :meth:`training_stats` (the ``training.tt``
      hygiene options). Their defaults do nothing: a layer opts in by
      overriding them. Hygiene reaches every ``SurgeryLayer`` of the model,
      nested ones included (the layer inside a ``qat`` wrapper); progressive
      rank only the surgered layers themselves (a wrapped layer is not cut).

    Every layer class a transform registers is run through one test battery
    (``tests/test_layer_battery.py``): forward against the dense op with
    ``to_dense()``, gradients to every parameter, ``from_config`` round trip,
    pickle, ``torch.compile``, ONNX export, and dtype/device moves.
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

    # -------------------------------------------- training hooks: progressive rank
    def cuttable_ranks(self) -> tuple[int, ...] | None:
        """The ranks progressive rank may cut, or ``None`` (the default) when the
        layer has none: progressive rank then leaves it as it is.

        A low-rank layer returns ``(rank,)``, a TT layer its inner ranks
        ``(r_1, ..., r_{d-1})``. The training loop records these at the first cut
        and asks :meth:`cut_ranks_` for a fraction of each at every stage.
        """
        return None

    def cut_ranks_(self, ranks: Sequence[int]) -> None:
        """Lower the ranks in place to ``ranks`` (one per entry of
        :meth:`cuttable_ranks`, each at least 1; a rank above the current one
        keeps the current one), keeping the best approximation of the weight the
        layer can find.

        The factors may become new ``nn.Parameter`` objects of other shapes: the
        caller rebuilds its optimizer afterwards. ``config()`` must describe the
        new shapes, so that a model saved after the cut loads again. Called only
        on layers whose :meth:`cuttable_ranks` is not ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no rank to cut")

    # ------------------------------------------- training hooks: factor hygiene
    def clip_norms_(self, max_norm: float) -> None:
        """Scale down in place every factor (core) whose Frobenius norm exceeds
        ``max_norm`` (``training.tt.clip_core_norm``, after each optimizer step).
        Default: nothing (the layer has no factors this applies to)."""

    def balance_norms_(self) -> None:
        """Give every factor the same Frobenius norm (their geometric mean), the
        weight unchanged (``training.tt.normalize_cores``, after each optimizer
        step). Default: nothing."""

    def reorthogonalize_(self) -> None:
        """Put the factors back in a canonical (orthogonal) form, the weight
        unchanged (``training.tt.reorthogonalize_every``). Default: nothing."""

    def training_stats(self) -> dict[str, Any] | None:
        """JSON-compatible numbers on the factors to log during training (ranks,
        norms; ``training.tt.log_stats_every``, logged as ``tt_stats.<module
        name>``), or ``None`` (the default) when the layer has nothing to log."""
        return None

    # ---------------------------------------------------------- weight caching
    def cached_dense(self, params: list[torch.Tensor]) -> torch.Tensor:
        """``to_dense()``, cached in inference until one of ``params`` changes.

        With gradients enabled (training) or under ``torch.compile`` the weight
        is rebuilt each call, so autograd and the compiler see the factors.
        """
        return self.cached_value("dense", params, self.to_dense)

    def reuses_weights(self, params: list[torch.Tensor]) -> bool:
        """Whether tensors derived from ``params`` can be cached across calls now:
        in eager inference (no gradient wanted), not under ``torch.compile`` nor
        while the TorchScript tracer records (ONNX export: the graph rebuilds the
        weight from the stored factors instead of holding a cached dense copy)."""
        if (
            self.__dict__.get("_no_weight_cache")
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
        ):
            return False  # (a wrapper passes new tensors each call: never cache them)
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def cached_value(self, name: Any, params: list[torch.Tensor], build) -> Any:
        """``build()``, cached under ``name`` in inference until one of ``params``
        changes (their version counter, storage, dtype or device); rebuilt each call
        when gradients are wanted, under ``torch.compile`` or the TorchScript tracer."""
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
