"""What ``layer.weight`` is on a replacement layer that no longer holds its dense
weight: :class:`DenseWeight`, a stand-in with the dense weight's metadata whose values
are rebuilt from the layer's factors when read (see its docstring). The layer
contract (:mod:`tnsurgery.layer`) makes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

if TYPE_CHECKING:
    from tnsurgery.layer import SurgeryLayer

__all__ = ["DenseWeight", "fx_tracing"]


def fx_tracing() -> bool:
    """Whether torch.fx's symbolic tracer is running (not torch.export nor compile)."""
    fx = torch.fx._symbolic_trace
    check = getattr(fx, "is_fx_symbolic_tracing", None)  # (torch >= 2.5)
    return check() if check is not None else fx.isfx_tracing()


def _getters(*names: str) -> set:
    return {getattr(torch.Tensor, n).__get__ for n in names if hasattr(torch.Tensor, n)}


def _methods(*names: str) -> set:
    return {getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)}


# What a DenseWeight answers without rebuilding anything: the dense weight's metadata.
_METADATA = _getters(
    "dtype", "shape", "device", "ndim", "layout", "itemsize", "nbytes",
    "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized",
    "is_nested", "is_mkldnn",
) | _methods(
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
    "is_complex", "is_signed", "get_device", "__len__", "__hash__",
)  # fmt: skip
# Copies and serializations: a plain tensor of the values, detached.
_SNAPSHOTS = _methods("__deepcopy__", "__reduce_ex__")
_DATA = torch.Tensor.data.__get__
_GRAD = torch.Tensor.grad.__get__
_REQUIRES_GRAD = torch.Tensor.requires_grad.__get__
# Writes to the tensor they are called on (besides ``name_`` methods and ``out=``).
_WRITES = {
    "__setitem__", "__set__", "__delete__", "__setstate__", "__iadd__", "__isub__",
    "__imul__", "__imatmul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
}  # fmt: skip


def _writes(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    in_place = name in _WRITES or (name.endswith("_") and not name.endswith("__"))
    # the tensor written: the first argument (``nn.init`` passes it by keyword)
    first = args[0] if args else next(iter(kwargs.values()), None)
    if in_place and isinstance(first, DenseWeight):
        return True
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, DenseWeight) for o in outs)


def _rebuilt(value: Any) -> Any:
    """``value`` with every :class:`DenseWeight` in it replaced by its values."""
    if isinstance(value, DenseWeight):
        return value.values()
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuilt(v) for v in value)
    if isinstance(value, dict):
        return {k: _rebuilt(v) for k, v in value.items()}
    return value


class DenseWeight(torch.Tensor):
    """What ``layer.weight`` is on a :class:`SurgeryLayer` that replaced a Linear or a
    convolution: a stand-in for the dense weight the layer no longer holds.

    - Its metadata is the dense weight's, free: ``shape``/``size()``, ``dtype``,
      ``device``, ``ndim``, ``numel()``, ``requires_grad`` (whether the layer's
      parameters want gradients); ``isinstance(w, torch.Tensor)`` holds. It is
      built at each read of ``layer.weight`` from the layer's current parameters
      (so it follows ``.to()``), over one element of memory (a zero-stride view).
    - Any op that reads its values (``x @ w.T``, ``w.float()``, ``w.clone()``,
      ``w.sum()``) runs on ``layer.to_dense()``, rebuilt from the factors for that
      op (gradients flow to them) and kept nowhere: the result is a plain tensor,
      correct. Copies, pickles and ``torch.save(w)`` hold the values (a plain
      tensor, detached). Keep ``layer.to_dense()`` yourself when you need the
      values repeatedly.
    - Writing to it (``w.copy_(...)``, ``w.mul_(2)``, ``nn.init.normal_(w)``,
      ``w[0] = 1``, ``w.data = ...``, ``out=w``) raises :class:`RuntimeError`: it
      would change a temporary, not the layer (``w.data`` is ``w`` itself, so
      ``w.data.normal_()`` raises too). Set the factors instead.

    Why not the alternatives: a plain zero-stride view of zeros has the right
    metadata but silently wrong values for any code that computes with it; a
    cached dense weight would keep, for every layer whose weight is read (T5 reads
    ``wo.weight`` at every forward), the very matrix the factorization removed;
    raising on every value read would break code that legitimately computes with
    the weight (comparisons, effective ranks, a tied head) where rebuilding it
    gives the right answer. It is never stored: not a parameter, buffer or
    attribute, so it is in no ``state_dict``, pickle or ``named_parameters``.

    Under ``torch.compile``, the TorchScript tracer (ONNX export) and torch.fx,
    ``layer.weight`` is ``layer.to_dense()`` itself, a plain tensor in the graph,
    which the compilers drop when only its metadata is read.
    """

    _layer: SurgeryLayer

    @staticmethod
    def __new__(
        cls, layer: SurgeryLayer, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> DenseWeight:
        base = torch.zeros((), dtype=dtype, device=device).expand(*shape)
        self = torch.Tensor._make_subclass(cls, base, False)
        self._layer = layer
        return self

    def values(self) -> torch.Tensor:
        """The dense weight: ``to_dense()`` of the layer (gradients flow to its factors)."""
        layer = self._layer
        try:
            dense = layer.to_dense()
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"{type(layer).__name__}.weight has no values: the layer implements no "
                "to_dense(); only its metadata (shape, dtype, device) can be read"
            ) from exc
        if tuple(dense.shape) != tuple(self.shape):
            raise RuntimeError(
                f"{type(layer).__name__}.to_dense() has shape {tuple(dense.shape)}, its "
                f"weight_shape() is {tuple(self.shape)}"
            )
        return dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _REQUIRES_GRAD:
            return any(p.requires_grad for p in args[0]._layer.parameters())
        if func == _DATA:
            return args[0]
        if func == _GRAD:
            return None  # (gradients go to the factors)
        if _writes(func, args, kwargs):
            layer = next(a for a in (*args, *kwargs.values()) if isinstance(a, DenseWeight))
            raise RuntimeError(
                f"{type(layer._layer).__name__}.weight is rebuilt from the layer's factors "
                f"at each read: writing to it ({getattr(func, '__name__', func)}) would "
                "change a temporary copy, not the layer; set its parameters instead"
            )
        if func in _SNAPSHOTS:
            with torch.no_grad():
                return func(*_rebuilt(args), **_rebuilt(kwargs))
        return func(*_rebuilt(args), **_rebuilt(kwargs))

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"DenseWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}) of a {type(self._layer).__name__}: the values are "
            "its to_dense(), rebuilt when an op reads them"
        )

    def __format__(self, spec: str) -> str:
        return repr(self) if not spec else format(self.values(), spec)
