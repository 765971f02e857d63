"""Putting a module in place of another, all or nothing: :class:`Swaps` records each
swap and undoes every one of them if the block it guards fails."""

from __future__ import annotations

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
