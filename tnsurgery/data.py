"""Batches from a spec's ``data`` section: the source is looked up among the
registered data sources (the built-in ones are plugins, in
:mod:`tnsurgery.builtins.data_sources`), its params validated, and its batches
cut to the number of examples asked for.

A batch is what the model takes: a tensor (one positional input), a tuple
(positional inputs) or a dict (keyword inputs, as Hugging Face models take).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tnsurgery.datasource import DataContext, DataSource
from tnsurgery.errors import DataSourceError, UserInputError
from tnsurgery.plugins import Registry, get_registry

__all__ = ["DataContext", "DataSource", "batches", "examples_in", "split", "take", "to_device"]


def examples_in(batch: Any) -> int:
    """Number of examples in a batch (dim 0 of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0]) if v.dim() else 1
    raise UserInputError(f"a batch holds no tensor: {type(batch).__name__}")


def take(batches: Iterable[Any], samples: int | None) -> Iterator[Any]:
    """The batches, cut so that they hold ``samples`` examples in all (all if ``None``)."""
    seen = 0
    for batch in batches:
        if samples is not None and seen >= samples:
            return
        n = examples_in(batch)
        if samples is not None and seen + n > samples:
            batch = slice_batch(batch, 0, samples - seen)
            n = samples - seen
        seen += n
        yield batch


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (non-tensor values kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(v[start:stop] if isinstance(v, torch.Tensor) else v for v in batch)


def split(data: Any, batch_size: int) -> Iterator[Any]:
    """``data`` (a tensor, tuple or dict of tensors) in batches of ``batch_size`` along dim 0."""
    n = examples_in(data)
    for start in range(0, n, batch_size):
        yield slice_batch(data, start, min(n, start + batch_size))


def batches(
    data: dict[str, Any],
    model: nn.Module | None = None,
    batch_size: int = 32,
    samples: int | None = None,
    seed: int = 0,
    registry: Registry | None = None,
) -> Iterator[Any]:
    """The batches described by a spec's ``data`` dict, at most ``samples`` examples.

    Whatever the source raises (when called, or while it gives its batches) comes out
    as a :class:`~tnsurgery.errors.DataSourceError` naming the source and the cause
    (a :class:`UserInputError` the source raised itself is passed on as it is)."""
    registry = registry or get_registry()
    name = str(data.get("source"))
    where = next(  # which function or file, for the message
        (f"{key} {data[key]}" for key in ("target", "path") if isinstance(data.get(key), str)),
        None,
    )
    try:
        source = registry.get_data_source(data.get("source"))
    except KeyError as exc:
        raise UserInputError(f"data: {exc.args[0]}") from None
    try:
        params = source.params_model.model_validate(
            {k: v for k, v in data.items() if k != "source"}
        )
    except ValidationError as exc:
        raise DataSourceError(name, f"invalid params: {exc}", where) from None
    ctx = DataContext(model=model, batch_size=batch_size, seed=seed)
    try:
        it = iter(source.batches(params, ctx))
    except UserInputError:
        raise
    except Exception as exc:
        raise DataSourceError(name, exc, where) from exc
    return take(_guarded(name, where, it), samples)


def _guarded(name: str, where: str | None, it: Iterator[Any]) -> Iterator[Any]:
    """The batches of ``it``, a failure of the source (not of the code consuming its
    batches) turned into a :class:`DataSourceError`."""
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserInputError:
                raise
            except Exception as exc:
                raise DataSourceError(name, exc, where) from exc
            yield batch
    finally:  # a source's generator (an open file...) closed as soon as it is done with
        close = getattr(it, "close", None)
        if close is not None:
            close()


def to_device(batch: Any, model: nn.Module) -> Any:
    """The batch on ``model``'s device, floating tensors in its dtype."""
    ref = next(iter(model.parameters()), None)
    if ref is None or ref.is_meta:  # (a skeleton: its weights are read later)
        return batch

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return t.to(device=ref.device, dtype=ref.dtype)
        return t.to(device=ref.device)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch)
    return move(batch)
