"""Markdown from the records: tables, the stamp line, and the generated sections of
``docs/benchmarks.md`` (between ``<!-- bench:NAME:start/end -->`` markers); the
``python -m tnsurgery.bench`` command."""

from __future__ import annotations

import argparse
import glob
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tnsurgery.bench.environment import repo_root
from tnsurgery.bench.markdown import render_record
from tnsurgery.bench.records import DOCS, OUT_DIR, read

MARKER = re.compile(
    r"^(<!-- bench:(?P<name>[\w.-]+)(?:/(?P<key>[\w.-]+))?:start -->\n)"
    r"(?P<body>.*?)"
    r"^(<!-- bench:(?P=name)(?(key)/(?P=key)):end -->)$",
    re.DOTALL | re.MULTILINE,
)  # a generated section: the markers on lines of their own, the body between


def render_docs(
    text: str, records: Iterable[Mapping[str, Any]]
) -> tuple[str, list[str], list[str]]:
    """Replace the generated sections of a markdown ``text`` by the ``records``.

    A section is ``<!-- bench:NAME:start -->`` ... ``<!-- bench:NAME:end -->`` (the
    whole record NAME) or the same with ``NAME/KEY`` (its table KEY). Where several
    records have the same name (e.g. runs of separate parts), a section comes from the
    last one that has its table. Returns the new text, the sections replaced, and the
    sections left as they were (no record, or no such table in it). Text outside the
    markers is kept byte for byte.
    """
    records = list(records)
    done: list[str] = []
    kept: list[str] = []

    def find(name: str, key: str | None) -> Mapping[str, Any] | None:
        for rec in reversed(records):
            if rec["name"] == name and (
                key is None or any(t.get("key") == key for t in rec["tables"])
            ):
                return rec
        return None

    def sub(m: re.Match[str]) -> str:
        name, key = m.group("name"), m.group("key")
        label = name + (f"/{key}" if key else "")
        rec = find(name, key)
        if rec is None:
            kept.append(label)
            return m.group(0)
        done.append(label)
        return m.group(1) + render_record(rec, key) + m.group(5)

    return MARKER.sub(sub, text), done, kept


def sections(text: str) -> list[str]:
    """The generated sections (``NAME`` or ``NAME/KEY``) that a markdown text holds."""
    return [
        m.group("name") + (f"/{m.group('key')}" if m.group("key") else "")
        for m in MARKER.finditer(text)
    ]


def _default_root() -> Path:
    return repo_root(Path.cwd()) or Path.cwd()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tnsurgery.bench render [JSON...]``: rewrite the generated sections of
    docs/benchmarks.md; ``show JSON [--key KEY]``: print a record as markdown."""
    ap = argparse.ArgumentParser(prog="python -m tnsurgery.bench", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="rewrite the generated sections of the docs")
    r.add_argument(
        "json",
        nargs="*",
        help=f"records (default: {OUT_DIR}/*.json, quick runs excluded)",
    )
    r.add_argument("--docs", default=None, help=f"the markdown file (default: {DOCS})")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
    r.add_argument(
        "--strict",
        action="store_true",
        help="refuse quick runs and runs with uncommitted changes",
    )
    s = sub.add_parser("show", help="print a record as markdown")
    s.add_argument("json")
    s.add_argument("--key", help="one table only")
    args = ap.parse_args(argv)

    if args.cmd == "show":
        print(render_record(read(args.json), args.key), end="")
        return 0

    root = _default_root()
    paths = args.json or sorted(
        p for p in glob.glob(str(root / OUT_DIR / "*.json")) if not p.endswith("-quick.json")
    )
    if not paths:
        print(f"no records given and none in {root / OUT_DIR}", file=sys.stderr)
        return 2
    records = []
    for p in paths:
        rec = read(p)
        st = rec.get("stamp", {})
        dirty = [k for k in ("package_dirty", "script_dirty", "script_dir_dirty") if st.get(k)]
        problems = (["a quick run"] if rec.get("quick") else []) + (
            [f"uncommitted changes ({', '.join(dirty)})"] if dirty else []
        )
        if problems:
            print(f"{p}: {' and '.join(problems)}", file=sys.stderr)
            if args.strict:
                return 2
        records.append(rec)
    docs = Path(args.docs) if args.docs else root / DOCS
    text = docs.read_text()
    new, done, kept = render_docs(text, records)
    names = {r["name"] for r in records}
    unused = sorted(names - {s.split("/")[0] for s in sections(text)})
    print(f"{docs}: {len(done)} section(s) from the records: {', '.join(done) or 'none'}")
    if kept:
        print(f"left as they were: {', '.join(kept)}")
    if unused:
        print(f"records with no section in {docs.name}: {', '.join(unused)}", file=sys.stderr)
    if args.check:
        return 1 if new != text else 0
    if new != text:
        docs.write_text(new)
    return 0
