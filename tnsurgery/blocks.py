"""A model's block stack, and running it one block at a time.

Most large models are a stack of identical blocks between a few small modules
(embeddings before, a norm and a head after). :func:`find_stack` finds that stack
(the one ``nn.ModuleList`` of same-class blocks holding most of the parameters, or
the one a spec pattern such as ``model.layers.*`` names). :func:`capture` runs the
model on a batch with every block but the first replaced by a recorder, so that
only the first block and the modules outside the stack need their weights: it
returns what each block receives (the first block's hidden states, and the other
arguments the model computes for every block: masks, positions, rotary tables).
:func:`run_block` runs one block on a stream of hidden states, and :func:`finish`
runs the modules after the stack on the last block's output, so a model too large
to hold is run block by block with one block in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnsurgery.hooks import hooked
from tnsurgery.tracing import call_model

__all__ = [
    "BlockStack",
    "Captured",
    "capture",
    "find_stack",
    "finish",
    "run_block",
    "run_recorded",
]


@dataclass
class BlockStack:
    """The blocks of a model, in order: ``name`` is the ``nn.ModuleList`` holding them."""

    name: str
    blocks: list[str]

    def index_of(self, module_name: str) -> int | None:
        """The block that holds ``module_name`` (``None`` outside the stack)."""
        prefix = self.name + "."
        if not module_name.startswith(prefix):
            return None
        head = module_name[len(prefix) :].split(".")[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else None


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_stack(model: nn.Module, name: str | None = None) -> BlockStack | None:
    """The block stack of ``model``: the ``nn.ModuleList`` named ``name`` (a trailing
    ``.*`` allowed) or else the largest list of at least two blocks of one class
    (holding at least a fifth of the parameters); ``None`` when there is none, or
    when another such list, not inside it, is at least a quarter of its size (an
    encoder-decoder's two stacks)."""
    if name is not None:
        name = name.removesuffix(".*")
        module = dict(model.named_modules()).get(name)
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            return None
        return BlockStack(name, [f"{name}.{i}" for i in range(len(module))])
    total = _numel(model)
    found = sorted(
        (
            (_numel(m), n)
            for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1
        ),
        reverse=True,
    )
    if not found or found[0][0] * 5 < total:
        return None
    size, n = found[0]
    others = [s for s, o in found[1:] if not o.startswith(n + ".") and s * 4 >= size]
    if others:
        return None  # several stacks (an encoder and a decoder)
    return BlockStack(n, [f"{n}.{i}" for i in range(len(model.get_submodule(n)))])


@dataclass
class BlockCall:
    """What the model gives one block: positional and keyword arguments (the hidden
    states, replaced by each stream's own, are the first positional argument, or the
    keyword ``hidden_states``)."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states the model gave the block."""
        return self.args[0] if self.args else self.kwargs[HIDDEN]

    def on(self, hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """The block's arguments with ``hidden`` for its hidden states."""
        if self.args:
            return (hidden, *self.args[1:]), self.kwargs
        return self.args, {**self.kwargs, HIDDEN: hidden}


HIDDEN = "hidden_states"


@dataclass
class Captured:
    """What :func:`capture` saw on one batch: each block's call, the first block's
    input hidden states, and the form of a block's output (a tensor or a tuple)."""

    calls: list[BlockCall]
    hidden: torch.Tensor
    returns_tuple: bool
    tail: tuple = field(default_factory=tuple)  # a tuple output's other items


class _Stop(Exception):
    """Raised by the last recorder: nothing after the stack needs to run."""


def _hidden_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def _forwards(modules: dict[nn.Module, Any]) -> Iterator[None]:
    """Each module's ``forward`` replaced by the function given, for the block's time."""
    for module, fn in modules.items():
        module.forward = fn
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def capture(model: nn.Module, stack: BlockStack, batch: Any) -> Captured:
    """Run ``model`` on ``batch`` up to the stack's last block, the first block for
    real and the others as recorders (see the module docstring); only the first block
    and the modules outside the stack need their weights."""
    blocks = [model.get_submodule(n) for n in stack.blocks]
    calls: list[BlockCall | None] = [None] * len(blocks)
    first: dict[str, Any] = {}

    def first_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[0] = BlockCall(args, kwargs)

    def recorder(i: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            calls[i] = BlockCall(args, kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            out = first["output"]
            h = BlockCall(args, kwargs).hidden
            return h if isinstance(out, torch.Tensor) else (h, *out[1:])

        return forward

    def first_out(mod: nn.Module, args: tuple, output: Any) -> None:
        first["output"] = output

    handles = [
        blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True),
        blocks[0].register_forward_hook(first_out),
    ]
    try:
        with _forwards({b: recorder(i) for i, b in enumerate(blocks) if i}), torch.no_grad():
            try:
                call_model(model, _no_cache(model, batch))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        missing = [stack.blocks[i] for i, c in enumerate(calls) if c is None]
        raise RuntimeError(f"the model did not call every block of its stack: {missing[:3]}")
    out = first["output"]
    tail = () if isinstance(out, torch.Tensor) else tuple(out[1:])
    return Captured(calls, calls[0].hidden, not isinstance(out, torch.Tensor), tail)


def _no_cache(model: nn.Module, batch: Any) -> Any:
    """``batch`` with ``use_cache=False`` for a Hugging Face model (a cache filled by
    each block would be carried from one stream to the next)."""
    config = getattr(model, "config", None)
    if isinstance(batch, dict) and getattr(config, "use_cache", None) is not None:
        return {**batch, "use_cache": False}
    return batch


def run_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """``block``'s output hidden states on ``hidden``, with the other arguments the
    model gave it."""
    with torch.no_grad():
        args, kwargs = call.on(hidden)
        return _hidden_of(block(*args, **kwargs))


def run_recorded(
    name: str, block: nn.Module, call: BlockCall, hidden: torch.Tensor, calls: dict[str, tuple]
) -> torch.Tensor:
    """:func:`run_block` on ``block`` (named ``name`` in the model); ``calls`` gets, for
    each module inside it, ``(args, kwargs, output)`` of its first call."""

    def make_hook(module_name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            calls.setdefault(module_name, (args, kwargs, output))

        return hook

    inside = [(n, m) for n, m in block.named_modules(prefix=name) if n != name]
    with hooked(inside, make_hook, with_kwargs=True):
        return run_block(block, call, hidden)


def finish(
    model: nn.Module, stack: BlockStack, batch: Any, captured: Captured, hidden: torch.Tensor
) -> Any:
    """The model's output on ``batch`` when its last block outputs ``hidden``: every
    block is skipped (none needs its weights) and the modules after the stack run."""
    blocks = [model.get_submodule(n) for n in stack.blocks]
    last = len(blocks) - 1

    def skip(i: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = hidden if i == last else BlockCall(args, kwargs).hidden
            return (h, *captured.tail) if captured.returns_tuple else h

        return forward

    with _forwards({b: skip(i) for i, b in enumerate(blocks)}), torch.no_grad():
        return call_model(model, _no_cache(model, batch))
