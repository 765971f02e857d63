"""The environment stamp of a benchmark run: machine, versions, and the commits of
the repository, the script and the package (with their uncommitted changes)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tnsurgery._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # tnsurgery/


# ----------------------------------------------------------------------------- environment


def _git(cwd: Path, *args: str) -> str | None:
    """Output of ``git -C cwd ARGS`` (stripped), or None when git or the repository is absent."""
    try:
        res = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def repo_root(path: str | Path | None = None) -> Path | None:
    """The root of the git repository holding ``path`` (a file or folder; default: the
    tnsurgery package), or None outside a repository."""
    p = Path(path).resolve() if path is not None else PACKAGE_DIR
    top = _git(p if p.is_dir() else p.parent, "rev-parse", "--show-toplevel")
    return Path(top) if top else None


def _dirty(root: Path, path: Path) -> bool | None:
    """Whether ``path`` has uncommitted changes (``git status --porcelain -- PATH``)."""
    out = _git(root, "status", "--porcelain", "--", str(path))
    return None if out is None else bool(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None where one is not installed)."""
    res: dict[str, str | None] = {}
    for name in dists:
        try:
            res[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            res[name] = None
    return res


ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def environment(script: str | Path | None = None) -> dict[str, Any]:
    """The environment stamp of a run: machine, software, and the exact source.

    Keys: ``date`` (UTC, ISO 8601), ``cpu``, ``cores``, ``machine``, ``memory_gib``,
    ``gpu``, ``torch``, ``threads`` (torch's intra-op threads), ``python``,
    ``tnsurgery`` (its version), ``package_path``, ``load_average`` (1, 5, 15 min),
    ``env`` (the thread-related variables that are set), ``commit`` (HEAD of the
    package's repository), ``package_dirty`` (``git status --porcelain -- tnsurgery/``
    is not empty),
    ``script`` (its path relative to its repository), ``script_commit`` (the last
    commit that changed it), ``script_dirty`` and ``script_dir_dirty`` (the folder of
    the script, whose shared modules it imports). Git fields are None outside a
    repository.
    """
    gpu = None
    try:
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken driver must not stop a CPU benchmark
        gpu = None
    stamp: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "tnsurgery": __version__,
        "package_path": str(PACKAGE_DIR),
        "load_average": [round(v, 2) for v in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "commit": None,
        "package_dirty": None,
        "script": None,
        "script_commit": None,
        "script_dirty": None,
        "script_dir_dirty": None,
    }
    root = repo_root(PACKAGE_DIR)
    if root is not None:
        stamp["commit"] = _git(root, "rev-parse", "HEAD")
        stamp["package_dirty"] = _dirty(root, PACKAGE_DIR)
    if script is not None:
        path = Path(script).resolve()
        sroot = repo_root(path)
        if sroot is None:
            stamp["script"] = str(path)
        else:
            stamp["script"] = path.relative_to(sroot).as_posix()
            stamp["script_commit"] = (
                _git(sroot, "log", "-1", "--format=%H", "--", str(path)) or None
            )
            stamp["script_dirty"] = _dirty(sroot, path)
            stamp["script_dir_dirty"] = _dirty(sroot, path.parent)
    return stamp


def describe(stamp: Mapping[str, Any]) -> str:
    """One line for a stamp: commit (and uncommitted changes), machine, software, date."""
    if stamp.get("commit"):
        parts = [f"commit {stamp['commit'][:10]}"]
    else:
        parts = [f"tnsurgery {stamp.get('tnsurgery')} from {stamp.get('package_path')} (no git)"]
    if stamp.get("script"):
        sc = (stamp.get("script_commit") or "uncommitted")[:10]
        parts.append(f"{stamp['script']} last changed in {sc}")
    dirty = [
        what
        for what, key in (
            ("tnsurgery/", "package_dirty"),
            (stamp.get("script") or "the script", "script_dirty"),
            ("the script's folder", "script_dir_dirty"),
        )
        if stamp.get(key)
    ]
    if dirty:
        parts.append("UNCOMMITTED CHANGES in " + ", ".join(dirty))
    machine = f"{stamp.get('cpu')}, {stamp.get('cores')} cores"
    if stamp.get("memory_gib"):
        machine += f", {stamp['memory_gib']:.0f} GiB"
    if stamp.get("gpu"):
        machine += f", {stamp['gpu']}"
    parts.append(machine)
    parts.append(f"torch {stamp.get('torch')}, {stamp.get('threads')} threads")
    parts.append(f"Python {stamp.get('python')}")
    libs = stamp.get("libraries") or {}
    if libs:
        parts.append(", ".join(f"{k} {v or 'absent'}" for k, v in libs.items()))
    if stamp.get("env"):
        parts.append(" ".join(f"{k}={v}" for k, v in stamp["env"].items()))
    load = stamp.get("load_average")
    if load:
        parts.append(f"load average {load[0]:.2f} at start")
    parts.append(str(stamp.get("date", ""))[:16].replace("T", " ") + " UTC")
    return "; ".join(parts)
