"""A benchmark's record: its stamp, command line, tables, notes and goals, as JSON."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tnsurgery.bench.environment import environment, repo_root, versions
from tnsurgery.bench.markdown import render_record
from tnsurgery.bench.timing import NOISE, Stats

OUT_DIR = "bench_out"
DOCS = "docs/benchmarks.md"


# ----------------------------------------------------------------------------- records


def _jsonable(v: Any) -> Any:
    """Cells and values as JSON: Stats as dicts, NaN/inf as None, tuples as lists."""
    if isinstance(v, Stats):
        return _jsonable(v.to_dict())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _jsonable(v.item())
    if isinstance(v, Path):
        return str(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


@dataclass
class Table:
    """One table of a record: rows of cells under ``columns``, with notes and goals.

    Cells are numbers, strings, None (rendered ``-``) or :class:`Stats` (rendered as
    the median with its spread). ``formats`` maps a column to a format spec for its
    numbers (e.g. ``".4f"``), ``"*"`` to one for the floats of every other column;
    other floats get about three significant digits.
    """

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    goals: list[dict[str, Any]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)

    def add(self, *cells: Any) -> None:
        """Append a row (as many cells as columns)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.key}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def note(self, text: str) -> None:
        """Append a note, rendered as a bullet under the table."""
        self.notes.append(text)

    def goal(self, goal: str, met: bool, result: str = "") -> None:
        """Append a goal check: what was asked, whether this run met it, and the figure."""
        self.goals.append({"goal": goal, "met": bool(met), "result": result})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return _jsonable(
            {
                "key": self.key,
                "title": self.title,
                "columns": self.columns,
                "rows": self.rows,
                "notes": self.notes,
                "goals": self.goals,
                "formats": self.formats,
            }
        )


def _command(argv: Sequence[str] | None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if argv:
        p = Path(argv[0])
        root = repo_root(p) if p.exists() else None
        if root is not None:
            argv[0] = p.resolve().relative_to(root).as_posix()
    return shlex.join(["python", *argv])


class Record:
    """The result of one benchmark run: the stamp, the command line, tables, notes.

    ``name`` names the JSON file and the docs markers; ``script`` is the benchmark's
    file (default ``sys.argv[0]``); ``quick`` marks a smoke run (written to
    ``NAME-quick.json`` by default, and flagged when rendered). Making a record
    clears the noise log.
    """

    def __init__(
        self,
        name: str,
        *,
        script: str | Path | None = None,
        quick: bool = False,
        argv: Sequence[str] | None = None,
        libraries: Sequence[str] = (),
    ) -> None:
        if not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"record name {name!r}: letters, digits, '_', '.', '-' only")
        if script is None and sys.argv and Path(sys.argv[0]).is_file():
            script = sys.argv[0]
        self.name, self.quick = name, quick
        self.root = (repo_root(script) if script else None) or repo_root() or Path.cwd()
        self.stamp = environment(script)
        if libraries:
            self.stamp["libraries"] = versions(*libraries)
        self.command = _command(argv)
        self.tables: list[Table] = []
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        NOISE.clear()

    def table(
        self,
        key: str,
        title: str,
        columns: Sequence[str] | str,
        formats: Mapping[str, str] | None = None,
    ) -> Table:
        """Add and return an empty table (``key``: its name in the docs markers;
        ``columns``: a list, or one string of names separated by ``|``)."""
        if isinstance(columns, str):
            columns = [c.strip() for c in columns.split("|")] if columns.strip() else []
        if not re.fullmatch(r"[\w.-]+", key):
            raise ValueError(f"table key {key!r}: letters, digits, '_', '.', '-' only")
        if any(t.key == key for t in self.tables):
            raise ValueError(f"table key {key!r} used twice")
        t = Table(key, title, list(columns), formats=dict(formats or {}))
        self.tables.append(t)
        return t

    def note(self, text: str) -> None:
        """Append a note on the whole run (its setup; rendered as a paragraph before
        the tables of a whole-record block)."""
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, quick, stamp, command, tables, notes, data, seconds, noise."""
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return _jsonable(
            {
                "name": self.name,
                "quick": self.quick,
                "stamp": self.stamp,
                "command": self.command,
                "seconds": round(time.perf_counter() - self._t0, 1),
                "load_average_end": load,
                "noise": NOISE.summary(),
                "tables": [t.to_dict() for t in self.tables],
                "notes": self.notes,
                "data": self.data,
            }
        )

    def default_path(self) -> Path:
        """``bench_out/NAME.json`` (``NAME-quick.json`` for a quick run) at the root of the
        script's repository (else the package's, else the current folder)."""
        return self.root / OUT_DIR / f"{self.name}{'-quick' if self.quick else ''}.json"

    def write(self, path: str | Path | None = None) -> Path:
        """Write the record as JSON (default :meth:`default_path`); returns the path."""
        p = Path(path) if path is not None else self.default_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        tmp.replace(p)
        return p

    def finish(self, path: str | Path | None = None) -> Path:
        """Write the record and print it as markdown, then where it was written."""
        p = self.write(path)
        print(render_record(self.to_dict()), flush=True)
        print(f"\nwritten: {p}", flush=True)
        return p


def read(path: str | Path) -> dict[str, Any]:
    """A record written by :meth:`Record.write`, as a dict."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "name" not in data or "tables" not in data:
        raise ValueError(f"{path}: not a benchmark record")
    return data
