"""Module-name patterns -> module names.

Glob patterns work on dotted names segment by segment: ``*`` (or any
``fnmatch`` pattern inside a segment, like ``query*``) matches within one
segment, ``**`` matches any number of segments, zero included. A pattern
starting with ``re:`` is a Python regular expression that must match the
whole name.
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from tnsurgery.layer import SurgeryLayer


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regex equivalent to a glob or ``re:`` pattern (used with ``fullmatch``)."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    parts = pattern.split(".")
    out = ""
    need_dot = False  # a segment was emitted and the next one needs its dot
    for i, seg in enumerate(parts):
        last = i == len(parts) - 1
        if seg == "**":
            if last:
                out += r"(?:\.[^.]+)*" if need_dot else r"(?:[^.]+(?:\.[^.]+)*)?"
            else:
                out += r"(?:\.[^.]+)*\." if need_dot else r"(?:[^.]+\.)*"
            need_dot = False
            continue
        if need_dot:
            out += r"\."
        out += _segment_regex(seg)
        need_dot = True
    return re.compile(out)


def _segment_regex(seg: str) -> str:
    # fnmatch within one segment: '*' and '?' never cross a dot
    body = []
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "*":
            body.append("[^.]*")
        elif ch == "?":
            body.append("[^.]")
        elif ch == "[" and (end := seg.find("]", i + 2)) != -1:  # [seq] / [!seq]
            inner = seg[i + 1 : end]
            neg = inner.startswith("!")
            chars = re.escape(inner[1:] if neg else inner).replace(r"\-", "-")
            body.append(f"[^.{chars}]" if neg else f"(?!\\.)[{chars}]")
            i = end
        else:
            body.append(re.escape(ch))
        i += 1
    return "".join(body)


def name_matches(name: str, patterns: list[str]) -> bool:
    """Whether a dotted module name matches any of the patterns."""
    return any(compile_pattern(p).fullmatch(name) for p in patterns)


def _resolve_type(name: str) -> type | None:
    if "." not in name:
        return None
    mod, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def type_matches(module: nn.Module, types: list[str]) -> bool:
    """Whether ``module`` is an instance of a class named in ``types``.

    A bare name (``Linear``) matches the class or any base class of that
    name; a qualified name (``torch.nn.Linear``) matches instances of the
    class it imports as, or of a class with that exact module path.
    """
    if not types:
        return True
    mro = type(module).__mro__
    for t in types:
        if "." not in t:
            if any(c.__name__ == t for c in mro):
                return True
            continue
        if any(f"{c.__module__}.{c.__qualname__}" == t for c in mro):
            return True
        cls = _resolve_type(t)
        if cls is not None and isinstance(module, cls):
            return True
    return False


@dataclass
class MatchResult:
    """What one rule selected in the model, and what it saw on the way.

    ``names`` are the targets (in ``named_modules`` order); ``wrong_type``
    the names that matched the patterns but not the types the rule or the
    transform accepts; ``excluded`` those removed by ``exclude``.
    """

    names: list[str] = field(default_factory=list)
    wrong_type: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def near_misses(self, all_names: list[str], patterns: list[str], n: int = 5) -> list[str]:
        """Closest module names to the patterns (difflib), for 'matched nothing' errors.

        ``all_names`` should be the candidates worth suggesting (e.g. the
        modules the transform accepts); each pattern is compared with whole
        names and with their last segment, so 'fc*' still finds 'head.fc'.
        """
        scores: dict[str, float] = {}
        for p in patterns:
            probe = p[3:] if p.startswith("re:") else p
            probe_last = probe.rsplit(".", 1)[-1]
            for cand in all_names:
                ratio = max(
                    difflib.SequenceMatcher(None, probe, cand).ratio(),
                    difflib.SequenceMatcher(None, probe_last, cand.rsplit(".", 1)[-1]).ratio(),
                )
                if ratio >= 0.3:
                    scores[cand] = max(scores.get(cand, 0.0), ratio)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], all_names.index(kv[0])))
        return [k for k, _ in ranked][:n]


def select(
    model: nn.Module,
    match: list[str],
    exclude: list[str],
    types: list[str],
    accepted: tuple[type, ...],
) -> MatchResult:
    """Modules of ``model`` selected by the patterns, the type filter and the
    transform's accepted classes. Never the root module, and never a part of a
    layer that surgery built (the convs inside a ``LowRankConv2d``...): a
    later rule can wrap such a layer whole, not split it further."""
    res = MatchResult()
    # the parts of a layer that surgery built are not targets of their own
    inside = {
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, SurgeryLayer)
        for c, _ in m.named_modules()
        if c
    }
    for name, module in model.named_modules():
        if not name or name in inside or not name_matches(name, match):
            continue
        if exclude and name_matches(name, exclude):
            res.excluded.append(name)
            continue
        if not type_matches(module, types) or (accepted and not isinstance(module, accepted)):
            res.wrong_type.append(name)
            continue
        res.names.append(name)
    return res
