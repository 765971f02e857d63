"""A signal landing between a temporary file's creation and the line that records it:
the writer's cleanup still removes it (``atomic.remove_ours``)."""

from __future__ import annotations

import tempfile

import pytest

from tnsurgery import atomic


class Interrupted(BaseException):
    pass


def _interrupt_after(monkeypatch, name: str) -> None:
    """``tempfile.<name>`` creates its file or directory, then a "signal" lands."""
    real = getattr(tempfile, name)

    def created_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(atomic.tempfile, name, created_then_interrupted)


def test_atomic_files_removes_a_temp_file_it_had_not_recorded(tmp_path, monkeypatch):
    (tmp_path / "keep.tmp").write_text("not ours")
    _interrupt_after(monkeypatch, "mkstemp")
    with pytest.raises(Interrupted), atomic.atomic_files(tmp_path / "o.safetensors"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp"]


def test_atomic_dir_removes_a_temp_dir_it_had_not_recorded(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, "mkdtemp")
    with pytest.raises(Interrupted), atomic.atomic_dir(tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_only_this_process_and_target_new_temporaries_are_removed(tmp_path):
    target = tmp_path / "o.pt"
    earlier = tmp_path / (atomic.temp_prefix(target) + "earlier.tmp")  # another writer's
    earlier.write_text("x")
    keep = atomic.ours(target)
    ours = tmp_path / (atomic.temp_prefix(target) + "abc.tmp")
    other_target = tmp_path / (atomic.temp_prefix(tmp_path / "p.pt") + "abc.tmp")
    other_process = tmp_path / ".o.pt.tnsurgery-1-abc.tmp"
    for p in (ours, other_target, other_process):
        p.write_text("x")
    (tmp_path / (atomic.temp_prefix(target) + "d.tmp")).mkdir()
    atomic.remove_ours(target, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [earlier.name, other_target.name, other_process.name]
    )
