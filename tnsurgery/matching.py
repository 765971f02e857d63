"""Module-name patterns -> module names.

Glob patterns work on dotted names segment by segment: ``*`` (or any
``fnmatch`` pattern inside a segment, like ``query*``) matches within one
segment, ``**`` matches any number of segments, zero included. A pattern
starting with ``re:`` is a Python regular expression that must match the
whole name.

Patterns come from spec files that someone else may have written: they are
bounded (:data:`MAX_PATTERN_LENGTH`) and every way they can fail to compile
(bad glob range, bad regex, a repetition too large, nesting too deep) is one
:class:`ValueError` from :func:`pattern_problem` / :func:`compile_pattern`, which
spec validation reports. Class names in ``types`` are never imported: a dotted
name is compared with each class's ``module.qualname`` and otherwise looked up
only in modules that are already imported (:func:`type_name_problem` says
which names are well formed).
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from tnsurgery.layer import SurgeryLayer

MAX_PATTERN_LENGTH = 1000
"""Most characters in one pattern (``match``, ``exclude``, ``distill.match``) or one
class name (``types``); module names are far shorter."""


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable pattern (``None`` when it is): empty, too long,
    or not compilable (bad glob character range, bad regex, repetition too large,
    nesting too deep). The message names the pattern."""
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return None


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regex equivalent to a glob or ``re:`` pattern (used with ``fullmatch``).

    Raises :class:`ValueError` naming the pattern when it is empty, longer than
    :data:`MAX_PATTERN_LENGTH` or does not compile."""
    if not isinstance(pattern, str):
        raise ValueError(f"a pattern is a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"pattern {shown(pattern)} has {len(pattern)} characters, more than the limit "
            f"of {MAX_PATTERN_LENGTH}"
        )
    is_regex = pattern.startswith("re:")
    if not pattern or pattern == "re:":
        raise ValueError("empty regex 're:'" if is_regex else "empty pattern")
    source = pattern[3:] if is_regex else _glob_regex(pattern)
    try:
        with warnings.catch_warnings():  # "possible nested set"...: the spec's business
            warnings.simplefilter("ignore")
            return re.compile(source)
    except re.error as exc:
        if is_regex:
            raise ValueError(f"bad regex {shown(source)}: {exc}") from None
        # the position would be in the translated regex: the reason alone
        raise ValueError(f"bad glob pattern {shown(pattern)}: {exc.msg}") from None
    except OverflowError as exc:  # a{99999999999}
        raise ValueError(f"bad regex {shown(source)}: {exc}") from None
    except RecursionError:  # ((((...))))
        raise ValueError(f"bad regex {shown(source)}: nested too deeply") from None


def shown(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, cut to about ``limit`` characters (for messages)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _glob_regex(pattern: str) -> str:
    """The regex source of a glob pattern (segments of a dotted name).

    Written so that no pattern makes matching try every way to split a name:
    consecutive ``**`` collapse, and within a segment each ``*`` takes the first
    place where what follows it fits, never trying the others (as ``fnmatch``).
    Patterns that alternate ``**`` with other segments still cost up to about
    ``2**segments`` steps per name, which module names keep small."""
    parts = _double_stars_collapsed(pattern.split("."))
    out = ""
    need_dot = False  # a segment was emitted and the next one needs its dot
    groups = iter(range(len(pattern)))
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
        out += _segment_regex(seg, groups)
        need_dot = True
    return out


def _double_stars_collapsed(parts: list[str]) -> list[str]:
    """``a.**.**.**.b`` -> ``a.**.b``, the same names: consecutive ``**`` segments
    are one (two when they end the pattern, where a ``**`` of its own means
    something else), so they cannot make the regex try every split."""
    out: list[str] = []
    for i, seg in enumerate(parts):
        if seg == "**" and out and out[-1] == "**" and i != len(parts) - 1:
            continue  # a '**' that is not the last, after a '**': nothing more
        out.append(seg)
    return out


def _segment_regex(seg: str, groups) -> str:
    """fnmatch within one segment: ``*`` and ``?`` never cross a dot. A ``*`` followed
    by more pattern and another ``*`` matches up to the first place where that
    pattern fits, atomically (a lookahead and a backreference: Python 3.10 has no
    atomic groups), so no name makes the regex backtrack through every split."""
    tokens: list[str | None] = []  # None is '*'; else the regex of one character
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "*":
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
        elif ch == "?":
            tokens.append("[^.]")
        elif ch == "[" and (end := seg.find("]", i + 2)) != -1:  # [seq] / [!seq]
            inner = seg[i + 1 : end]
            neg = inner.startswith("!")
            chars = re.escape(inner[1:] if neg else inner).replace(r"\-", "-")
            tokens.append(f"[^.{chars}]" if neg else f"(?!\\.)[{chars}]")
            i = end
        else:
            tokens.append(re.escape(ch))
        i += 1
    out = []
    k = 0
    while k < len(tokens) and tokens[k] is not None:  # what comes before the first '*'
        out.append(tokens[k])
        k += 1
    while k < len(tokens):  # tokens[k] is a '*'
        k += 1
        fixed = []
        while k < len(tokens) and tokens[k] is not None:
            fixed.append(tokens[k])
            k += 1
        if k == len(tokens):  # the last '*': ordinary backtracking, linear
            out.append("[^.]*" + "".join(fixed))
        else:
            g = f"g{next(groups)}"
            out.append(f"(?=(?P<{g}>[^.]*?{''.join(fixed)}))(?P={g})")
    return "".join(out)


def name_matches(name: str, patterns: list[str]) -> bool:
    """Whether a dotted module name matches any of the patterns."""
    return any(compile_pattern(p).fullmatch(name) for p in patterns)


def type_name_problem(name: str) -> str | None:
    """Why ``name`` is not a class name for ``types`` (``None`` when it is one): a
    name is an identifier (``Linear``) or a dotted path of identifiers
    (``torch.nn.Linear``), at most :data:`MAX_PATTERN_LENGTH` characters."""
    if not isinstance(name, str):
        return f"a class name is a string, not {type(name).__name__}"
    if len(name) > MAX_PATTERN_LENGTH:
        return (
            f"class name {shown(name)} has {len(name)} characters, more than the limit of "
            f"{MAX_PATTERN_LENGTH}"
        )
    if not name:
        return "empty class name"
    if not all(part.isidentifier() for part in name.split(".")):
        return (
            f"bad class name {shown(name)}: expected a class name ('Linear') or a dotted "
            "path of names ('torch.nn.Linear')"
        )
    return None


def _resolve_type(name: str) -> type | None:
    """The class a dotted name refers to, looked up in modules that are already
    imported (``sys.modules``) and never importing one: importing runs code, and
    the name comes from a spec."""
    if "." not in name or type_name_problem(name) is not None:
        return None
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except Exception:  # a module's __getattr__ may raise anything: no such class
            return None
        return obj if isinstance(obj, type) else None
    return None


def type_matches(module: nn.Module, types: list[str]) -> bool:
    """Whether ``module`` is an instance of a class named in ``types``.

    A bare name (``Linear``) matches the class or any base class of that
    name; a qualified name (``torch.nn.Linear``) matches instances of a class
    with that exact ``module.qualname``, or of the class the name refers to in an
    already imported module (nothing is imported).
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
