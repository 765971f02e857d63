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

from tnsurgery.dense_weight import DenseWeight, fx_tracing

__all__ = ["DenseWeight", "SurgeryLayer"]

# What a layer caches in its ``__dict__`` (rebuilt weights; a TT layer's contraction
# plans): dropped from pickles, so a pickled model holds tensors and modules only.
_CACHES = ("_weight_cache", "_plans")


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
      ``quant_axes()`` (what a ``qat`` wrapper quantizes), ``weight_shape()`` and
      ``weight_dtype_device()`` (what ``layer.weight`` reports; see below);
    - optional training hooks, called by the training loop on every
      ``SurgeryLayer`` of the model, so training never names a concrete
      layer class: :meth:`cuttable_ranks` / :meth:`cut_ranks_` (progressive
      rank) and :meth:`clip_norms_`, :meth:`balance_norms_`,
      :meth:`reorthogonalize_`, :meth:`training_stats` (the ``training.tt``
      hygiene options). Their defaults do nothing: a layer opts in by
      overriding them. Hygiene reaches every ``SurgeryLayer`` of the model,
      nested ones included (the layer inside a ``qat`` wrapper); progressive
      rank only the surgered layers themselves (a wrapped layer is not cut).

    Drop-in attributes: model code often reads attributes of the module it calls
    (Hugging Face T5 casts its input to ``self.wo.weight.dtype``; others read
    ``weight.device``, ``weight.shape``, ``in_features``...). A layer that
    replaces a Linear keeps its ``in_features``/``out_features``, one that
    replaces a Conv2d its ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``groups``; and every such layer
    answers ``weight`` (see :meth:`weight_shape`) with a :class:`DenseWeight`:
    the replaced weight's shape, dtype and device, no memory, values rebuilt by
    ``to_dense()`` only when an op reads them. A layer that holds a real
    ``weight`` (a parameter, buffer or attribute of that name) keeps it.

    Every layer class a transform registers is run through one test battery
    (``tests/test_layer_battery.py``): forward against the dense op with
    ``to_dense()``, gradients to every parameter, ``from_config`` round trip,
    pickle, ``torch.compile``, ONNX export, and dtype/device moves.
    """

    def to_dense(self) -> torch.Tensor:
        """The dense weight of the layer this one replaced, rebuilt from the factors."""
        raise NotImplementedError

    # ------------------------------------------------- drop-in: ``layer.weight``
    @torch.jit.unused  # (TorchScript compiles properties: this one stays in Python)
    @property
    def weight(self) -> torch.Tensor:
        """The weight of the module this layer replaced, as model code reads it: a
        :class:`DenseWeight` of :meth:`weight_shape` and :meth:`weight_dtype_device`
        (metadata free, values ``to_dense()`` when an op reads them). A layer that
        holds a real ``weight`` (an attribute, parameter, buffer or submodule of
        that name) gives it instead; one that replaces no Linear nor convolution
        has none (``AttributeError``)."""
        d = self.__dict__
        if "weight" in d:  # a plain attribute (see the setter)
            return d["weight"]
        for slots in ("_parameters", "_buffers", "_modules"):
            if "weight" in d.get(slots, ()):
                # through nn.Module.__getattr__: torch.fx patches it to record the read
                return nn.Module.__getattr__(self, "weight")
        missing = AttributeError(f"'{type(self).__name__}' object has no attribute 'weight'")
        if d.get("_registering_weight"):  # (nn.Module asks hasattr() before registering)
            raise missing
        return self._weight_stand_in(missing)

    @weight.setter
    def weight(self, value: Any) -> None:
        # Reached from nn.Module.__setattr__ for a value that is no Parameter, buffer
        # or Module (those it registers itself): a plain attribute, as on nn.Module.
        self.__dict__["weight"] = value

    @weight.deleter
    def weight(self) -> None:
        if "weight" not in self.__dict__:
            raise AttributeError("weight")
        del self.__dict__["weight"]

    def _registering(self, name: str, register, *args) -> None:
        """``register(name, *args)`` (nn.Module's), with no stand-in ``weight`` meanwhile:
        nn.Module refuses to register a name ``hasattr()`` already finds."""
        if name != "weight":
            register(name, *args)
            return
        self.__dict__["_registering_weight"] = True
        try:
            register(name, *args)
        finally:
            del self.__dict__["_registering_weight"]

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        self._registering(name, super().register_parameter, param)

    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        self._registering(name, super().register_buffer, tensor, persistent)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        self._registering(name, super().add_module, module)

    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of the weight of the module this layer replaced, which
        ``layer.weight`` reports; ``None``: the layer has no ``weight``.

        By default read from the replaced module's attributes, which the layer
        keeps: ``(out_features, in_features)`` for a Linear, ``(out_channels,
        in_channels // groups, *kernel_size)`` for a convolution. Override it
        where the layer replaces something else with a weight."""
        out_f, in_f = getattr(self, "out_features", None), getattr(self, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int):
            return (out_f, in_f)
        out_c, in_c = getattr(self, "out_channels", None), getattr(self, "in_channels", None)
        kernel = getattr(self, "kernel_size", None)
        if isinstance(out_c, int) and isinstance(in_c, int) and kernel is not None:
            kernel = (kernel,) if isinstance(kernel, int) else tuple(int(k) for k in kernel)
            return (out_c, in_c // int(getattr(self, "groups", 1)), *kernel)
        return None

    def weight_dtype_device(self) -> tuple[torch.dtype, torch.device] | None:
        """The dtype and device ``layer.weight`` reports: those of the layer's first
        floating-point parameter (buffer, when it has none), which ``.to()``,
        ``.double()``, ``.half()`` move; ``None`` when it holds none (no ``weight``)."""
        own = self._parameters.values()  # (most layers' first one: no module walk)
        for tensors in (own, self.parameters(), self.buffers()):
            for t in tensors:
                if t is not None and t.is_floating_point():
                    return t.dtype, t.device
        return None

    def _weight_stand_in(self, missing: AttributeError) -> torch.Tensor:
        shape = self.weight_shape() if "_parameters" in self.__dict__ else None
        if shape is None:  # (or a half-built object, e.g. while unpickling)
            raise missing
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # A graph is being recorded: the weight is rebuilt in it from the factors
            # (dropped by the compiler when only its metadata is read).
            return self.to_dense()
        if fx_tracing():
            return self._fx_weight()
        like = self.weight_dtype_device()
        if like is None:  # no floating-point tensor to take them from (a stripped copy)
            raise missing
        return DenseWeight(self, shape, *like)

    def _fx_weight(self) -> Any:
        """``weight`` under torch.fx's symbolic tracer: ``to_dense()`` in the graph, and
        the read recorded as fx records a Linear's, a ``get_attr`` node of
        ``<layer>.weight`` (left unused: at run time it is a free :class:`DenseWeight`),
        so that :mod:`tnsurgery.tracing` sees that the model reads this layer's weight,
        whatever submodule its parameters live in. Where ``to_dense()`` cannot be
        traced (a wrapper's quantizer branches on its tensors), that ``get_attr`` node
        is the weight itself: the graph reads the :class:`DenseWeight` at run time."""
        try:
            dense = self.to_dense()
        except torch.fx.proxy.TraceError:
            dense = None
        tracer = getattr(dense, "tracer", None)  # a Proxy: to_dense() read the parameters
        if not isinstance(tracer, torch.fx.Tracer):  # (read them by name: a wrapper's)
            tracer = self._fx_tracer()
        if isinstance(tracer, torch.fx.Tracer):
            try:
                path = tracer.path_of_module(self)
            except NameError:  # not a submodule of what is traced: nothing to mark
                path = None
            if path is not None:
                read = tracer.create_proxy("get_attr", f"{path}.weight", (), {})
                return read if dense is None else dense
        if dense is None:
            raise torch.fx.proxy.TraceError(
                f"{type(self).__name__}.weight cannot be traced outside the model"
            )
        return dense

    def _fx_tracer(self) -> torch.fx.Tracer | None:
        """The running fx tracer, from a tensor of the layer read as model code reads it
        (fx answers such a read with a Proxy); ``None`` when none answers so."""
        for tensors in (self.named_parameters(), self.named_buffers()):
            for name, _ in tensors:
                owner_name, _, attr = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                tracer = getattr(getattr(owner, attr), "tracer", None)
                if isinstance(tracer, torch.fx.Tracer):
                    return tracer
        return None

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
            or fx_tracing()  # (what it builds holds proxies of the trace)
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
        for cache in _CACHES:  # never pickled (rebuilt when needed)
            state.pop(cache, None)
        return state

    @classmethod
    def from_config(cls, config: dict[str, Any], current: nn.Module | None = None) -> SurgeryLayer:
        """Build an empty layer from ``config``; ``current`` is the module now at the
        target's place (useful to wrappers); its weights are loaded afterwards."""
        return cls(**config)
