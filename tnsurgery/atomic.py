"""Atomic writes: every output is written under a temporary name beside its target and
renamed into place only once all of it was written, so a failure never leaves a
partial file.

Temporary names carry the writing process's id (``.NAME.tnsurgery-PID-XXXX.tmp``):
a process killed before it could clean up (SIGKILL, power loss) leaves them behind,
and the next write to the same target removes those whose process is gone
(:func:`sweep_stale`). An ``OSError`` while writing (disk full, read-only
directory, permissions) becomes an :class:`~tnsurgery.errors.OutputError`, a user
error, with the target named.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tnsurgery.errors import OutputError

__all__ = ["atomic_dir", "atomic_files", "ours", "remove_ours", "sweep_stale", "temp_prefix"]


def temp_prefix(target: Path) -> str:
    """The prefix of every temporary name written for ``target`` by this process."""
    return f".{target.name}.tnsurgery-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporary files and directories that a killed writer of ``target``
    left beside it (their process is gone); returns what was removed."""
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tnsurgery-(\d+)-[^/]*\.(tmp|old)$")
    removed = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if not m or _alive(int(m.group(1))):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(entry: Path) -> None:
    """Remove a temporary file or directory (a link is removed, not followed)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temp file or dir (created 0600/0700) the mode a plain write would have."""
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~_umask())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _as_output_error(targets: tuple[Path, ...]) -> Iterator[None]:
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        what = ", ".join(str(t) for t in targets)
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {what}: {reason}") from exc


@contextmanager
def atomic_files(*targets: Path) -> Iterator[list[Path]]:
    """Temporary paths to write, renamed onto ``targets`` only if the block succeeds,
    in the order given: put the file that completes a set (its manifest) last.

    On failure the temporary files are removed and the targets are untouched. Stale
    temporary files of killed earlier writers are removed first.
    """
    temps: list[Path] = []
    before = {t: ours(t) for t in targets}
    try:
        with _as_output_error(targets):
            for t in targets:
                t.parent.mkdir(parents=True, exist_ok=True)
                sweep_stale(t)
                fd, name = tempfile.mkstemp(prefix=temp_prefix(t), suffix=".tmp", dir=t.parent)
                os.close(fd)
                temps.append(Path(name))
            yield temps
            for tmp in temps:
                _publish_mode(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            for tmp, t in zip(temps, targets, strict=True):
                os.replace(tmp, t)
            for parent in {t.parent for t in targets}:
                _fsync_dir(parent)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for t in targets:
            remove_ours(t, before[t])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False``
    where the system cannot."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def ours(target: Path) -> set[str]:
    """Names of this process's temporary files and directories beside ``target``."""
    prefix = temp_prefix(target)
    try:
        return {
            e.name
            for e in target.parent.iterdir()
            if e.name.startswith(prefix) and e.suffix in (".tmp", ".old")
        }
    except OSError:
        return set()


def remove_ours(target: Path, keep: set[str]) -> None:
    """Remove this process's temporaries beside ``target`` but those in ``keep`` (the
    ones there before the writer started): also one a signal (Ctrl-C, SIGTERM)
    interrupted between its creation and the line that records it, which the writer's
    own cleanup does not know of."""
    for name in ours(target) - keep:
        _remove(target.parent / name)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary directory that replaces ``target`` only if the block succeeds.

    An existing ``target`` is exchanged with the new directory in one step where
    the system allows it (Linux), so a reader sees the old directory or the new
    one, never none; elsewhere it is moved aside first.
    """
    tmp: Path | None = None
    before = ours(target)
    try:
        with _as_output_error((target,)):
            target.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(target)
            tmp = Path(
                tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
            )
            yield tmp
            _publish_mode(tmp, directory=True)
            for f in tmp.rglob("*"):
                if f.is_file() and not (f.stat().st_mode & 0o044):
                    _publish_mode(f)
            if target.exists() or target.is_symlink():
                if _exchange(tmp, target):  # tmp now holds the old directory (or link)
                    if tmp.is_symlink() or not tmp.is_dir():
                        tmp.unlink()
                    else:
                        shutil.rmtree(tmp, ignore_errors=True)
                else:
                    old = Path(
                        tempfile.mkdtemp(
                            prefix=temp_prefix(target), suffix=".old", dir=target.parent
                        )
                    )
                    os.replace(target, old / "x")
                    os.replace(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        remove_ours(target, before)
