"""Helpers of tests/security: the CLI in-process, small surgered models on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tnsurgery
from tnsurgery.cli import cli

ROOT = Path(__file__).resolve().parents[2]
RANK4 = {"version": 1, "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}]}


def invoke(*args, input: str | None = None):
    """Run the CLI in-process (stdout and stderr apart); never raises."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def refused(result, *words: str) -> None:
    """Exit 2, a message (no traceback, no 'Internal error'), naming ``words``."""
    text = result.output
    assert result.exit_code == 2, text
    assert "Internal error" not in text and "Traceback" not in text, text
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        out[rel] = None if p.is_dir() or p.is_symlink() else p.read_bytes()
    return out


def plain_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def surgered_dir(tmp_path: Path, name: str = "out") -> Path:
    """A surgered model saved with tnsurgery.save (manifest.json + model.safetensors)."""
    small = tnsurgery.surgery.apply(plain_mlp(), RANK4)
    return tnsurgery.save(small, tmp_path / name)


def edit_manifest(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.fixture
def write_json():
    def write(path: Path, data) -> Path:
        path.write_text(json.dumps(data))
        return path

    return write
