"""Atomic writes: every output is written under a temporary name beside its target and
renamed into place only once all of it was written, so a failure never leaves a
partial file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_files"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temp file or dir (created 0600/0700) the mode a plain write would have."""
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~_umask())


@contextmanager
def atomic_files(*targets: Path) -> Iterator[list[Path]]:
    """Temporary paths to write, renamed onto ``targets`` only if the block succeeds.

    On failure the temporary files are removed and the targets are untouched.
    """
    temps = []
    try:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent)
            os.close(fd)
            temps.append(Path(name))
        yield temps
        for tmp, t in zip(temps, targets, strict=True):
            _publish_mode(tmp)
            os.replace(tmp, t)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary directory that replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        for f in tmp.rglob("*"):
            if f.is_file() and not (f.stat().st_mode & 0o044):
                _publish_mode(f)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
