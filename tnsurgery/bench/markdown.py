"""Markdown of the records: cells, tables, the stamp line that opens every block."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tnsurgery.bench.environment import describe
from tnsurgery.bench.timing import Stats

# ----------------------------------------------------------------------------- rendering


def fmt(v: Any, spec: str | None = None) -> str:
    """A cell as text: None ``-``; a Stats dict as ``median ±spread %``; floats with
    ``spec`` or about three significant digits."""
    if v is None:
        return "-"
    if isinstance(v, Stats):
        v = v.to_dict()
    if isinstance(v, Mapping) and "median" in v:
        text = fmt(v["median"], spec)
        med, q1, q3 = v.get("median"), v.get("q1"), v.get("q3")
        if v.get("n", 1) > 1 and med and q1 is not None and q3 is not None:
            text += f" ±{100 * (q3 - q1) / 2 / abs(med):.0f}%"
        return text
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if spec:
            return format(v, spec)
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    if isinstance(v, int) and spec:
        return format(v, spec)
    return str(v)


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _floaty(v: Any) -> bool:
    return isinstance(v, (float, Stats)) or (isinstance(v, Mapping) and "median" in v)


def render_table(table: Mapping[str, Any], heading: str = "###") -> str:
    """A table of a record as markdown: its title (a heading, or a bold line when
    ``heading`` is empty), the table, its notes and its goal checks."""
    lines = []
    title = table.get("title") or ""
    if title:
        lines += [f"{heading} {title}" if heading else f"**{title}**", ""]
    cols = table.get("columns") or []
    formats = table.get("formats") or {}
    if cols:
        lines.append("| " + " | ".join(_cell(c) for c in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in table.get("rows") or []:
            cells = [
                _cell(fmt(v, formats.get(c, formats.get("*") if _floaty(v) else None)))
                for c, v in zip(cols, row, strict=False)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for note in table.get("notes") or []:
        lines.append(f"- {note}")
    if table.get("notes"):
        lines.append("")
    goals = table.get("goals") or []
    if goals:
        lines += ["Goals (from this run):", ""]
        for g in goals:
            verdict = "met" if g.get("met") else "**MISSED**"
            result = f"{g['result']} " if g.get("result") else ""
            lines.append(f"- {result}[goal: {g.get('goal')}: {verdict}]")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def stamp_line(record: Mapping[str, Any]) -> str:
    """The line that opens every generated block: what ran, where, at which commit."""
    noise = record.get("noise") or {}
    parts = [f"`{record.get('command', record.get('name'))}`", describe(record.get("stamp", {}))]
    if record.get("seconds") is not None:
        parts.append(f"{record['seconds']:.0f} s")
    if noise.get("stretches"):
        parts.append(
            f"other processes used median {100 * noise['others_median']:.1f} %, max "
            f"{100 * noise['others_max']:.1f} % of the cores during timed steps, "
            f"{noise.get('reruns', 0)} re-run"
            + (
                f"; kept although disturbed: {', '.join(noise['noisy'])}"
                if noise.get("noisy")
                else ""
            )
        )
    text = "_Generated from " + "; ".join(parts) + "._"
    if record.get("quick"):
        text = "**Quick smoke run: not the benchmark's figures.** " + text
    return text


SPREAD_NOTE = (
    "_Times are medians of interleaved repeats; `±x%` is half their interquartile range, "
    "relative to the median; ratios are medians of per-round ratios._"
)


def render_record(record: Mapping[str, Any], key: str | None = None) -> str:
    """A record (or its table ``key``) as a markdown block that opens with its stamp."""
    tables = record.get("tables") or []
    if key is not None:
        tables = [t for t in tables if t.get("key") == key]
        if not tables:
            raise KeyError(f"{record.get('name')}: no table {key!r}")
    lines = [stamp_line(record), ""]
    if key is None and record.get("notes"):
        lines += [*record["notes"], ""]
    if any(_has_stats(t) for t in tables):
        lines += [SPREAD_NOTE, ""]
    for t in tables:
        lines.append(render_table(t, heading="###" if key is None else ""))
    return "\n".join(lines).rstrip() + "\n"


def _has_stats(table: Mapping[str, Any]) -> bool:
    return any(
        isinstance(c, Mapping) and "median" in c and c.get("n", 1) > 1
        for row in table.get("rows") or []
        for c in row
    )
