"""How the model uses its target modules: torch.fx trace, or a hooked forward pass.

:func:`trace` first tries ``torch.fx.symbolic_trace`` with the targets kept
as leaves; the graph gives the call order and count of every target, and
whether the model reads a target's weight directly (a tied weight used
outside the module). Many real models do not trace (data-dependent control
flow, Hugging Face models under transformers 5): then it falls back to
forward hooks on a run of the sample input, and says so with the tracing
error. With a sample input, both paths record input and output shapes, from
which FLOPs are computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from tnsurgery.flops import module_flops
from tnsurgery.hooks import hooked

__all__ = [
    "CallInfo",
    "TraceResult",
    "call_model",
    "eval_mode",
    "module_flops",
    "sharing",
    "tensor_bytes",
    "trace",
]


@dataclass
class CallInfo:
    """How one target module is used. ``None`` means unknown."""

    order: int | None = None
    calls: int | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    weight_read_directly: bool = False


@dataclass
class TraceResult:
    """Result of :func:`trace` for a set of targets."""

    method: str  # "fx", "hooks" (fallback with a sample input) or "none"
    error: str | None = None  # why torch.fx failed, when it did
    calls: dict[str, CallInfo] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the plan."""
        if self.method == "fx":
            return "torch.fx symbolic trace"
        reason = f" (torch.fx failed: {self.error})" if self.error else ""
        if self.method == "hooks":
            return f"forward hooks on the sample input{reason}"
        return f"no trace{reason}; give a sample input to see calls and shapes"


def call_model(model: nn.Module, sample_input: Any) -> Any:
    """Call ``model`` on a sample input: a tensor, a tuple of positional args, or a dict."""
    if isinstance(sample_input, dict):
        return model(**sample_input)
    if isinstance(sample_input, (tuple, list)):
        return model(*sample_input)
    return model(sample_input)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode (dropout off) and no-grad, restoring their modes after."""
    modes = [{m: m.training for m in model.modules()} for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for saved in modes:
            for m, training in saved.items():
                m.training = training


def _first_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value:
        return _first_shape(value[0])
    if isinstance(value, dict) and value:
        return _first_shape(next(iter(value.values())))
    return None


class _LeafTracer(torch.fx.Tracer):
    """The targets are leaves; the modules that hold one are traced through, even those
    fx keeps whole by default (``torch.nn``'s, e.g. an ``nn.TransformerEncoderLayer``
    whose attention was split): as leaves, their targets would look never called."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.holders = {n.rsplit(".", i)[0] for n in leaves for i in range(1, n.count(".") + 1)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        return qualname not in self.holders and super().is_leaf_module(m, qualname)


def _fx_calls(model: nn.Module, targets: list[str]) -> tuple[torch.fx.GraphModule, dict]:
    tracer = _LeafTracer(set(targets))
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)
    calls = {t: CallInfo(calls=0) for t in targets}
    order = 0
    target_set = set(targets)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in target_set:
            info = calls[node.target]
            if info.order is None:
                info.order = order
                order += 1
            info.calls = (info.calls or 0) + 1
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            if owner in target_set:
                calls[owner].weight_read_directly = True
    return gm, calls


def _hooked_run(
    model: nn.Module, run_on: nn.Module, targets: list[str], sample_input: Any
) -> dict[str, CallInfo]:
    modules = dict(model.named_modules())
    calls = {t: CallInfo(calls=0) for t in targets}
    counter = [0]

    def make_hook(name: str):
        def hook(mod, args, kwargs, output):
            info = calls[name]
            if info.order is None:
                info.order = counter[0]
                counter[0] += 1
                info.input_shape = _first_shape(args) or _first_shape(kwargs)
                info.output_shape = _first_shape(output)
            info.calls += 1

        return hook

    with hooked([(t, modules[t]) for t in targets], make_hook, with_kwargs=True):
        with eval_mode(run_on):
            call_model(run_on, sample_input)
    return calls


def trace(
    model: nn.Module,
    targets: list[str],
    sample_input: Any = None,
    method: str = "auto",
) -> TraceResult:
    """Record call order, call count and shapes of each target module.

    Args:
        model: the model; it is run (in eval mode, no grad) only when
            ``sample_input`` is given, and never modified.
        targets: dotted module names.
        sample_input: a tensor, a tuple of positional args or a dict of kwargs.
        method: ``"auto"`` (fx, else hooks), ``"fx"`` or ``"hooks"`` (tests
            use the last two to check that both paths agree).
    """
    error = None
    if method in ("auto", "fx"):
        try:
            gm, calls = _fx_calls(model, targets)
        except Exception as exc:  # any tracing failure means: fall back
            if method == "fx":
                raise
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            if sample_input is not None:
                shapes = _hooked_run(model, gm, targets, sample_input)
                for t, info in calls.items():
                    info.input_shape = shapes[t].input_shape
                    info.output_shape = shapes[t].output_shape
            return TraceResult("fx", None, calls)
    if sample_input is None:
        return TraceResult("none", error, {t: CallInfo() for t in targets})
    return TraceResult("hooks", error, _hooked_run(model, model, targets, sample_input))


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, shared tensors once (what a
    weights file stores for it)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _byte_range(t: torch.Tensor) -> tuple[str, int, int] | None:
    """``(device, first, end)``: the addresses of the bytes ``t`` can reach,
    ``[first, end)`` (the span from its first to its last element: views, slices,
    transposes and strides included). ``None`` when ``t`` has no bytes to share
    (empty, or without storage: meta tensors)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        base = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    size = t.element_size()
    first = base + t.storage_offset() * size
    reach = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) * size
    return str(t.device), first, first + reach + size


def sharing(model: nn.Module) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Modules registered under several names, and parameters shared between modules.

    Returns ``(aliases, tied)``: ``aliases[name]`` lists the other names of the
    same module object; ``tied[name]`` lists the other modules that hold one
    of its parameters (tied weights) or a parameter whose storage overlaps one
    of its own (``nn.Parameter(a.weight.data)``, a transposed or sliced view of
    it): replacing one of them alone would silently untie them.
    """
    by_module: dict[int, list[str]] = {}
    owned: list[tuple[int, torch.Tensor]] = []  # (id of the module, one of its parameters)
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in by_module:  # another name of a module seen: same parameters
            if name not in by_module[id(module)]:
                by_module[id(module)].append(name)
            continue
        by_module[id(module)] = [name]
        owned.extend((id(module), p) for p in module._parameters.values() if p is not None)
    aliases: dict[str, list[str]] = {}
    for names in by_module.values():
        for n in names:
            aliases[n] = [o for o in names if o != n]
    # parameters in one group when they are the same object or their bytes overlap
    parent = list(range(len(owned)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_id: dict[int, int] = {}
    spans: list[tuple[str, int, int, int]] = []
    for i, (_, p) in enumerate(owned):
        if id(p) in by_id:
            parent[find(i)] = find(by_id[id(p)])
        by_id.setdefault(id(p), i)
        span = _byte_range(p)
        if span is not None:
            spans.append((*span, i))
    spans.sort()
    reach: tuple[str, int, int] | None = None  # (device, end of the bytes seen, index)
    for device, lo, hi, i in spans:  # by address: overlapping spans are one group
        if reach is not None and reach[0] == device and lo < reach[1]:
            parent[find(i)] = find(reach[2])
            reach = (device, max(reach[1], hi), reach[2])
        else:
            reach = (device, hi, i)
    groups: dict[int, set[int]] = {}
    for i, (owner, _) in enumerate(owned):
        groups.setdefault(find(i), set()).add(owner)
    tied: dict[str, list[str]] = {}
    for owners in groups.values():
        if len(owners) < 2:
            continue
        for owner in owners:
            others = sorted(n for o in owners if o != owner for n in by_module[o])
            for n in by_module[owner]:
                tied.setdefault(n, [])
                tied[n].extend(o for o in others if o not in tied[n])
    return aliases, tied
