"""A model's structure and state, all or nothing: :class:`Swaps` records each module
swap and undoes every one of them if the block it guards fails;
:func:`restored_on_failure` gives a model back exactly as it was (modules, tensors and
their values, attributes) when its block fails; :func:`copy_model` deep-copies a model
keeping tensors that share storage shared."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Swaps:
    """``with Swaps(model) as swaps: swaps.swap(name, new)``: on any exception in the
    block every module swapped in is taken out again, in reverse order, so the model
    is exactly as it was; on success the swaps stay."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.undo: list[tuple[nn.Module, str, nn.Module | None]] = []

    def swap(self, name: str, new: nn.Module) -> nn.Module | None:
        """Put ``new`` at dotted ``name``; returns the module that was there."""
        parent_name, _, attr = name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        old = parent._modules[attr]
        parent._modules[attr] = new
        self.undo.append((parent, attr, old))
        return old

    def rollback(self) -> None:
        """Undo every swap made so far."""
        for parent, attr, old in reversed(self.undo):
            parent._modules[attr] = old
        self.undo.clear()

    def __enter__(self) -> Swaps:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, except that Parameters on one storage (tied through
    ``.data``, or views of one another) stay on one storage in the copy:
    ``nn.Parameter.__deepcopy__`` clones each alone, which would untie them."""
    by_storage: dict[tuple[str, int], dict[int, nn.Parameter]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if type(p) is nn.Parameter and p.numel() and p.device.type != "meta":
                key = (str(p.device), p.untyped_storage().data_ptr())
                by_storage.setdefault(key, {})[id(p)] = p
    memo: dict[int, Any] = {}
    for params in by_storage.values():
        if len(params) > 1:  # copied as views of one copied storage (the memo keeps it)
            for p in params.values():
                memo[id(p)] = nn.Parameter(copy.deepcopy(p.data, memo), p.requires_grad)
    return copy.deepcopy(model, memo)


_MISSING = object()


@contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """On any failure in the block, give ``model`` back exactly as it was: the same
    module objects in place, every parameter and buffer (the same tensor objects, on
    the same storage, bit-identical values, ``requires_grad`` and ``.grad``), each
    module's attributes (the manifest among them, nothing added left behind)."""
    modules = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in model.modules()
    ]
    tensors, seen = [], set()
    for m, *_ in modules:
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append((t, t.data, t.detach().clone(), t.requires_grad, t.grad))
    try:
        yield
    except BaseException:
        for m, attrs, params, buffers, children in modules:
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            for key, value in attrs.items():
                if m.__dict__.get(key, _MISSING) is not value:
                    m.__dict__[key] = value
            for now, then in (
                (m._parameters, params),
                (m._buffers, buffers),
                (m._modules, children),
            ):
                now.clear()
                now.update(then)
        with torch.no_grad():
            for t, data, values, requires_grad, grad in tensors:
                if not _same_view(t.data, data):  # its data replaced: the original put back
                    t.data = data
                t.copy_(values)
                if t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
                if t.grad is not grad:
                    t.grad = grad
        raise


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )
