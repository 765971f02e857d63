"""What a data-source plugin provides: :class:`DataSource` and the :class:`DataContext`
it is called with (see the ``register_data_sources`` hook)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import nn


@dataclass
class DataContext:
    """What a source may use: the model (e.g. its tokenizer's location, its dtype),
    the batch size, and a seed."""

    model: nn.Module | None = None
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class DataSource:
    """A named source of batches, as a plugin registers it.

    Attributes:
        name: the spec's ``"source"``.
        params_model: pydantic model of the other keys (``extra="forbid"``).
        batches: ``batches(params, ctx) -> iterable of batches`` (tensor, tuple
            of tensors, or dict of tensors), each of at most ``ctx.batch_size``
            examples along dim 0.
        description: one line for ``tnsurgery plugins``.
    """

    name: str
    params_model: type[BaseModel]
    batches: Callable[[BaseModel, DataContext], Iterable[Any]]
    description: str = ""
