"""Interrupted writes: ``tnsurgery apply`` killed (SIGKILL, SIGINT, SIGTERM) at several
moments while it writes a model large enough that writing takes a while. Afterwards
each output file is complete and loadable, or absent, or (beside an earlier run's
files) refused as a mixed set; the input is unchanged; a rerun succeeds and leaves
no temporary file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tnsurgery import io
from tnsurgery.errors import ModelLoadError

TNSURGERY = shutil.which("tnsurgery")
ATTEMPTS = 5
pytestmark = pytest.mark.skipif(TNSURGERY is None, reason="the console script is not installed")


def big_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])  # 34 MB


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("interrupt")
    torch.save(big_model(), d / "in.pt")
    (d / "spec.json").write_text(
        json.dumps({"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 8}}]})
    )
    return d


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tnsurgery-" in p.name)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(d: Path, out: str) -> subprocess.Popen:
    env = {**os.environ, "TNSURGERY_DEBUG": ""}
    return subprocess.Popen(
        [TNSURGERY, "apply", "spec.json", "in.pt", "-o", out],
        cwd=d,
        env=env,
        # Ctrl-C as a terminal sends it, whoever started the tests (a shell's background
        # job, e.g. under nohup, has SIGINT ignored, and its children inherit that)
        preexec_fn=_default_sigint,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(d: Path, condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition(d):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def check_outputs(d: Path, out: str) -> None:
    """Every output file is complete and loadable, absent, or refused as a mixed set."""
    stem = out.rsplit(".", 1)[0]
    for name in (out, f"{stem}.safetensors"):
        path = d / name
        if not path.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                base = big_model()
                loaded = io.load(path, base)
            else:
                loaded = io.load_model(path).model
        except ModelLoadError as exc:
            assert "incomplete or mixed" in str(exc) or "no tnsurgery manifest" in str(exc), exc
            continue
        assert isinstance(loaded, nn.Module)


MOMENTS = {
    "first temp file": lambda d: bool(temps(d)),
    "weights written": lambda d: any(
        n.startswith(".o") and n.endswith(".tmp") and (d / n).stat().st_size > 10_000_000
        for n in temps(d)
    ),
    "main file renamed": lambda d: (d / "o.pt").exists(),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-output"])
def test_sigkill_at_any_moment_leaves_a_whole_or_refused_set(workdir, moment, earlier):
    d = workdir
    for p in d.iterdir():
        if p.name not in ("in.pt", "spec.json"):
            p.unlink()
    before = digest(d / "in.pt")
    if earlier:
        first = subprocess.run(
            [TNSURGERY, "apply", "spec.json", "in.pt", "-o", "o.pt"], cwd=d, capture_output=True
        )
        assert first.returncode == 0, first.stderr
        if moment == "main file renamed":  # it exists already: wait for its replacement
            old = (d / "o.pt").stat().st_mtime_ns
            MOMENTS_LOCAL = lambda dd: (dd / "o.pt").stat().st_mtime_ns != old  # noqa: E731
        else:
            MOMENTS_LOCAL = MOMENTS[moment]
    else:
        MOMENTS_LOCAL = MOMENTS[moment]
    proc = start(d, "o.pt")
    reached = wait_for(d, MOMENTS_LOCAL, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not reached:
        pytest.skip(f"the write finished before '{moment}' could be caught")
    assert digest(d / "in.pt") == before
    check_outputs(d, "o.pt")
    rerun = subprocess.run(
        [TNSURGERY, "apply", "spec.json", "in.pt", "-o", "o.pt"], cwd=d, capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert temps(d) == []
    assert isinstance(io.load_model(d / "o.pt").model, nn.Module)
    assert digest(d / "in.pt") == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_clean_up_their_temp_files(workdir, sig):
    d = workdir
    for p in d.iterdir():
        if p.name not in ("in.pt", "spec.json"):
            p.unlink()
    before = digest(d / "in.pt")
    # the signal can land after the last temp file is renamed (a write of 34 MB takes a
    # few milliseconds): a run that finished is whole and clean, and is tried again
    for _ in range(ATTEMPTS):
        proc = start(d, "o.pt")
        reached = wait_for(d, MOMENTS["first temp file"], proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        if not reached:
            pytest.skip("the write finished before it could be interrupted")
        if proc.returncode != 0:
            break
        assert temps(d) == []
        check_outputs(d, "o.pt")
        for p in d.iterdir():
            if p.name not in ("in.pt", "spec.json"):
                p.unlink()
    else:
        pytest.fail(f"{ATTEMPTS} runs finished although signalled while writing")
    assert proc.returncode == 128 + sig, proc.stderr.read().decode()[-500:]  # not 1: no bug
    assert temps(d) == [], "an interrupted write left temporary files"
    assert digest(d / "in.pt") == before
    check_outputs(d, "o.pt")
