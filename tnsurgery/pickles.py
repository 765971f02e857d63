"""Reading what a pickle would call, without running it.

PyTorch's ``weights_only`` unpickler calls any allowed global that a pickle
``REDUCE``s: a 1 KB file can ask for ``torch.nn.Linear(16000, 16000)`` or
``bytearray(1500000000)`` and make the reader allocate gigabytes. ``torch.save``
calls only a few tensor-rebuilding functions (modules are rebuilt with ``NEWOBJ`` and
their saved state), so :func:`pickle_calls` lists every call a pickle makes, with
the globals among its arguments, and :func:`unexpected_calls` keeps those that
``torch.save`` never writes. The stack is followed symbolically with
:mod:`pickletools`: nothing is imported or built. A zip record that is compressed
(``torch.save`` never compresses: a deflated record can expand a thousandfold) is
refused by :func:`pickle_calls` too.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickletools
import signal
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from tnsurgery.errors import ModelLoadError

_MARK = object()
_STRINGS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
}
_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET = {"GET", "BINGET", "LONG_BINGET"}


# What torch.save writes as calls (tensors, parameters, containers), by the names a
# pickle uses for them (protocol 2 names builtins "__builtin__").
SAFE_CALLS = frozenset(
    {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",  # float8 and other dtypes without a storage type
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "builtins.set",
        "__builtin__.set",
        "builtins.frozenset",
        "__builtin__.frozenset",
        "builtins.complex",
        "__builtin__.complex",
    }
)
# torch._tensor._rebuild_from_type_v2(func, new_type, args, state) calls ``func``: safe
# only when ``func`` is and ``new_type`` is a plain tensor type.
FROM_TYPE = "torch._tensor._rebuild_from_type_v2"
TENSOR_TYPES = frozenset(
    {
        "torch._tensor.Tensor",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
    }
)


class CompressedRecord(ValueError):
    """A zip record of a ``.pt`` file is compressed (``torch.save`` never does it)."""


Source = Path | BinaryIO


def _pickles(source: Source) -> Iterator[bytes]:
    """The pickle streams of a ``torch.save`` file (a path or an open binary file):
    every ``.pkl`` record of the zip format (whatever its case: PyTorch finds records
    case-insensitively), or the whole file for the legacy format (several pickles in a
    row). An open file is read from its start and left there."""
    if not isinstance(source, Path):
        source.seek(0)
    try:
        if zipfile.is_zipfile(source):
            if not isinstance(source, Path):
                source.seek(0)
            with zipfile.ZipFile(source) as z:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CompressedRecord(info.filename)
                for info in z.infolist():
                    if info.filename.lower().endswith(".pkl"):
                        yield z.read(info)
            return
        if isinstance(source, Path):
            yield source.read_bytes()
        else:
            source.seek(0)
            yield source.read()
    finally:
        if not isinstance(source, Path):
            source.seek(0)


def _calls_in(data: bytes) -> Iterator[tuple[str, list[str | None]]]:
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        stack: list[Any] = []
        memo: dict[Any, Any] = {}
        try:
            ops = list(pickletools.genops(stream))
        except Exception:  # noqa: BLE001 - not a pickle (legacy raw data): stop reading
            return
        for op, arg, _ in ops:
            name = op.name
            if name == "MARK":
                stack.append(_MARK)
            elif name in _STRINGS:
                stack.append(("str", arg))
            elif name == "GLOBAL":
                stack.append(("global", str(arg).replace(" ", ".", 1)))
            elif name == "STACK_GLOBAL":
                attr = stack.pop() if stack else None
                module = stack.pop() if stack else None
                if (
                    isinstance(module, tuple)
                    and module[0] == "str"
                    and isinstance(attr, tuple)
                    and attr[0] == "str"
                ):
                    stack.append(("global", f"{module[1]}.{attr[1]}"))
                else:
                    stack.append(None)
            elif name in _PUT:
                memo[arg] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in _GET:
                stack.append(memo.get(arg))
            elif name == "EMPTY_TUPLE":
                stack.append(("tuple", []))
            elif name == "TUPLE":
                stack.append(("tuple", _pop_mark(stack)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [stack.pop() if stack else None for _ in range(n)][::-1]
                stack.append(("tuple", items))
            elif name == "INST":
                yield str(arg).replace(" ", ".", 1), _globals(_pop_mark(stack))
                stack.append(None)
            elif name in ("REDUCE", "OBJ"):
                if name == "REDUCE":
                    args = stack.pop() if stack else None
                    fn = stack.pop() if stack else None
                    items = args[1] if isinstance(args, tuple) and args[0] == "tuple" else []
                else:
                    popped = _pop_mark(stack)
                    fn, items = (popped[0], popped[1:]) if popped else (None, [])
                if isinstance(fn, tuple) and fn[0] == "global":
                    yield fn[1], _globals(items)
                else:
                    yield "?", []  # a call of something that is not a plain global
                stack.append(None)
            else:
                _generic(op, stack)


def _globals(items: list[Any]) -> list[str | None]:
    return [i[1] if isinstance(i, tuple) and i[0] == "global" else None for i in items]


def _pop_mark(stack: list[Any]) -> list[Any]:
    items: list[Any] = []
    while stack:
        top = stack.pop()
        if top is _MARK:
            break
        items.append(top)
    items.reverse()
    return items


def _generic(op: pickletools.OpcodeInfo, stack: list[Any]) -> None:
    before = op.stack_before
    if pickletools.markobject in before:
        _pop_mark(stack)
        for _ in range(before.index(pickletools.markobject)):
            if stack:
                stack.pop()
    else:
        for _ in before:
            if stack:
                stack.pop()
    for _ in op.stack_after:
        stack.append(None)


def pickle_calls(path: Source) -> list[tuple[str, list[str | None]]]:
    """Every call the pickles in ``path`` make (``REDUCE``, ``OBJ``, ``INST``), in
    order, without loading anything: the dotted name of the callable (``"?"`` when it
    is not a plain global) and, for each argument, the global it names or ``None``.

    Raises :class:`CompressedRecord` for a compressed zip record."""
    calls: list[tuple[str, list[str | None]]] = []
    for data in _pickles(path):
        calls.extend(_calls_in(data))
    return calls


def unexpected_calls(path: Source, allowed: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The calls of :func:`pickle_calls` that ``torch.save`` never writes (and that are
    not in ``allowed``, the classes the user allows), by name, each once."""
    found: list[str] = []
    for name, args in pickle_calls(path):
        if name in SAFE_CALLS or name in allowed:
            continue
        if (
            name == FROM_TYPE
            and len(args) >= 2
            and (args[0] in SAFE_CALLS or args[0] in allowed)
            and args[1] in TENSOR_TYPES
        ):
            continue
        if name not in found:
            found.append(name)
    return found


# Reading a file may take this long (plus a second per 20 MB): rebuilding objects whose
# saved state makes them costly (an RNN with a million layers) is refused beyond it.
LOAD_SECONDS = 60.0


class _TookTooLong(Exception):
    pass


def _size(source: Source) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    return os.fstat(source.fileno()).st_size if hasattr(source, "fileno") else 0


@contextlib.contextmanager
def time_limit(source: Source, label: object) -> Iterator[None]:
    """Refuse a load that runs past :data:`LOAD_SECONDS` (+1 s per 20 MB of the file);
    only in the main thread (where signals are delivered), else no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds = LOAD_SECONDS + _size(source) / 20e6

    def expired(signum, frame):
        raise _TookTooLong

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TookTooLong:
        raise ModelLoadError(
            f"{label}: rebuilding its objects took longer than {seconds:.0f} s (a pickle "
            "whose saved state is costly to rebuild): refused"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tensors(obj: Any, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 50:
        return
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, nn.Module):
        yield from obj.named_parameters()
        yield from obj.named_buffers()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            for name, t in _tensors(v, depth + 1):
                yield f"{k}.{name}".rstrip("."), t
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for name, t in _tensors(v, depth + 1):
                yield f"{i}.{name}".rstrip("."), t


def check_tensor_extents(obj: Any, label: object) -> None:
    """Refuse tensors that are views many times larger than their storage (stride 0):
    a few bytes in the file that any computation expands to gigabytes; and meta
    tensors, which hold no values."""
    for name, t in _tensors(obj):
        if t.is_meta:
            raise ModelLoadError(
                f"{label}: tensor {name or '(top level)'} is on the meta device (it holds no "
                "values): refused"
            )
        if not t.numel():
            continue
        held = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        if t.numel() > max(16 * held, 1 << 20):
            raise ModelLoadError(
                f"{label}: tensor {name or '(top level)'} of shape {tuple(t.shape)} is a view "
                f"of {held} stored elements (stride 0): refused"
            )


def load_weights_only(
    source: Source,
    label: object,
    allowed_globals: list[Any] | tuple[Any, ...] = (),
    allowed_calls: frozenset[str] = frozenset(),
) -> Any:
    """``torch.load(source, weights_only=True)`` of an untrusted file, bounded:
    :func:`unexpected_calls` first (calls ``torch.save`` never writes, compressed
    records: refused), the unpickling under :func:`time_limit`, then
    :func:`check_tensor_extents`. ``allowed_globals`` are the classes the caller
    allows; ``allowed_calls`` the names of those that may also be called (the user's).
    Every refusal is a :class:`ModelLoadError` naming ``label`` (the file)."""
    try:
        called = unexpected_calls(source, allowed_calls)
    except CompressedRecord as exc:
        raise ModelLoadError(
            f"{label}: record {exc} is compressed, which torch.save never does (a compressed "
            "record can expand a thousandfold): refused. Save it again with torch.save."
        ) from None
    if called:
        raise ModelLoadError(
            f"{label}: the file calls {', '.join(called)} to build its objects, which "
            "torch.save never does (it could run code or make tnsurgery allocate any size): "
            "refused. If you trust this file, pass --trust-pickle."
        )
    with torch.serialization.safe_globals(list(allowed_globals)), time_limit(source, label):
        obj = torch.load(source, map_location="cpu", weights_only=True)
    check_tensor_extents(obj, label)
    return obj
