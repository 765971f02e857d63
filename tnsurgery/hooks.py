"""Forward hooks that never outlive their use: :func:`hooked` registers one hook per
named module and removes every one of them when the block ends, however it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def hooked(
    modules: Iterable[tuple[str, nn.Module]],
    make: Callable[[str], Callable],
    *,
    pre: bool = False,
    with_kwargs: bool = False,
) -> Iterator[None]:
    """Within the block, each ``(name, module)`` carries the hook ``make(name)``: a
    forward hook ``hook(module, args, output)`` (``with_kwargs``: ``hook(module, args,
    kwargs, output)``), or with ``pre`` a pre-hook ``hook(module, args)``."""
    handles = []
    try:
        for name, module in modules:
            if pre:
                handles.append(module.register_forward_pre_hook(make(name)))
            else:
                handles.append(module.register_forward_hook(make(name), with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()
