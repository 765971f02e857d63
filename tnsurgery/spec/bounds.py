"""Bounds on a spec's data: a spec may come from someone else, so before anything
walks it, it is checked to be plain JSON data of bounded size (issue 12, "untrusted
files stay data").

The same bounds hold for a file (:func:`tnsurgery.spec.read_spec_file`) and for a dict
given to :func:`tnsurgery.spec.load_spec` or :meth:`Spec.model_validate`:

- :data:`MAX_SPEC_BYTES`: a spec file's size, and the characters of all its strings
  (keys included) with YAML aliases expanded;
- :data:`MAX_SPEC_VALUES`: values (objects, lists, strings, numbers...) with YAML
  aliases (or a dict's shared objects) expanded: a "billion laughs" alias bomb stops
  here, before anything copies or serializes it;
- :data:`MAX_SPEC_DEPTH`: nesting of objects and lists (a cycle is too deep);
- :data:`MAX_SPEC_INT`: the magnitude of an integer (larger ones never reach code
  that allocates or loops);
- numbers are finite (no NaN, no Infinity); strings are valid Unicode (no lone
  surrogate); object keys are strings; values are JSON types (a tuple counts as a
  list).

The walk is iterative (no recursion) and stops at the first problem, which names
the path to the value (``rules.0.params.rank``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from pydantic import BaseModel

from tnsurgery.spec.resolve import rule_label

MAX_SPEC_BYTES = 1 << 20
"""Largest spec file (1 MiB); also the most characters of all a spec's strings."""
MAX_SPEC_VALUES = 100_000
"""Most values in a spec, YAML aliases expanded."""
MAX_SPEC_DEPTH = 32
"""Deepest nesting of objects and lists (the spec itself is level 1)."""
MAX_SPEC_INT = 2**53
"""Largest magnitude of an integer (the integers a float holds exactly)."""


class HugeInt:
    """An integer literal too long to convert (left as text by the file readers,
    reported by :func:`bounds_problem` with its path)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"<integer of {len(self.text)} characters>"


def bounds_problem(data: Any) -> str | None:
    """The first way ``data`` breaks the bounds, as a message naming the path to the
    value; ``None`` when it is within them."""
    problem = _first_problem(data)
    if problem is None:
        return None
    path, message = problem
    return f"{_where(data, path)}: {message}"


def _first_problem(data: Any) -> tuple[tuple, str] | None:
    values = 0
    chars = 0
    # (value, path, depth); a pydantic model given in place of a dict is its dump
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        values += 1
        if values > MAX_SPEC_VALUES:
            return (), (
                f"more than {MAX_SPEC_VALUES} values (YAML aliases expanded); a spec is far smaller"
            )
        if isinstance(value, BaseModel):
            try:
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            except Exception as exc:
                return path, f"cannot read {type(value).__name__}: {exc}"
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_SPEC_DEPTH:
                return path, f"nested deeper than the limit of {MAX_SPEC_DEPTH} levels"
            if isinstance(value, dict):
                items = list(value.items())
                for key, _ in items:
                    if not isinstance(key, str):
                        return path, (
                            f"key {_short(key)} is a {type(key).__name__}; "
                            "object keys are strings (quote it in YAML)"
                        )
                    chars += len(key)
                    if chars > MAX_SPEC_BYTES:
                        return (), _TOO_MUCH_TEXT
                    bad = _text_problem(key)
                    if bad:
                        return path, f"key {bad}"
            else:
                items = list(enumerate(value))
            if len(items) > MAX_SPEC_VALUES:
                return path, f"more than {MAX_SPEC_VALUES} values"
            stack.extend((v, (*path, k), depth + 1) for k, v in reversed(items))
        elif isinstance(value, str):
            chars += len(value)
            if chars > MAX_SPEC_BYTES:
                return (), _TOO_MUCH_TEXT
            bad = _text_problem(value)
            if bad:
                return path, f"{bad}"
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, HugeInt):
            return path, (
                f"integer of {len(value.text)} characters is too large "
                f"(the limit is {MAX_SPEC_INT} in magnitude)"
            )
        elif isinstance(value, numbers.Integral):  # int, numpy integers
            if abs(int(value)) > MAX_SPEC_INT:
                return path, (
                    f"integer {_short(value)} is too large "
                    f"(the limit is {MAX_SPEC_INT} in magnitude)"
                )
        elif isinstance(value, numbers.Real):  # float, numpy floats
            if not _finite(value):
                return path, f"{_short(value)} is not a finite number"
        else:
            return path, (
                f"a {type(value).__name__} is not spec data (strings, "
                "numbers, true/false, null, lists and objects only)"
            )
    return None


_TOO_MUCH_TEXT = (
    f"more than {MAX_SPEC_BYTES} characters of text (YAML aliases expanded); a spec is far smaller"
)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):
        return False


def _text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{_short(text)} is not valid Unicode text ({exc.reason})"
    return None


def _where(data: Any, path: tuple) -> str:
    """``rule 2 (match 'fc*'): field 'params.rank'``, ``spec: field 'training.lr'``."""
    where = "spec"
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        rule = rules[path[1]] if isinstance(rules, (list, tuple)) else None
        where = rule_label(path[1], rule.get("match") if isinstance(rule, dict) else None)
        path = path[2:]
    if not path:
        return where
    return f"{where}: field '" + ".".join(_short(p, quote=False) for p in path) + "'"


def _short(value: Any, quote: bool = True, limit: int = 60) -> str:
    """A value for a message: ``repr`` (or ``str``), cut to about ``limit`` characters,
    lone surrogates escaped."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**60:
        return f"<integer of {value.bit_length()} bits>"  # str() refuses 4300+ digits
    text = repr(value) if quote or not isinstance(value, str) else value
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."
