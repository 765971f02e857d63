"""Reading what a pickle would call, without running it.

PyTorch's ``weights_only`` unpickler calls any allowed global that a pickle
``REDUCE``s: a 1 KB file can ask for ``torch.nn.Linear(16000, 16000)`` and make the
reader allocate a gigabyte. ``torch.save(model)`` never calls a module class (it
rebuilds modules with ``NEWOBJ`` and their saved state), so :func:`pickle_calls`
lists the globals a pickle calls, and the loader refuses a module class among them.
The stack is followed symbolically with :mod:`pickletools`: nothing is imported or
built.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _pickles(path: Path) -> Iterator[bytes]:
    """The pickle streams of a ``torch.save`` file: ``data.pkl`` of the zip format,
    or the whole file for the legacy format (several pickles in a row)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".pkl"):
                    yield z.read(info)
        return
    yield path.read_bytes()


def _calls_in(data: bytes) -> Iterator[str]:
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
            elif name == "INST":
                yield str(arg).replace(" ", ".", 1)
                _pop_mark(stack)
                stack.append(None)
            elif name in ("REDUCE", "OBJ"):
                if name == "REDUCE":
                    if stack:
                        stack.pop()  # the arguments
                    fn = stack.pop() if stack else None
                else:
                    items = _pop_mark(stack)
                    fn = items[0] if items else None
                if isinstance(fn, tuple) and fn[0] == "global":
                    yield fn[1]
                stack.append(None)
            else:
                _generic(op, stack)


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


def pickle_calls(path: Path) -> list[str]:
    """The dotted names of the globals that the pickles in ``path`` call (``REDUCE``,
    ``OBJ``, ``INST``), in order, without loading anything."""
    names: list[str] = []
    for data in _pickles(path):
        names.extend(_calls_in(data))
    return names
