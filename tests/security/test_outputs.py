"""Writers touch only what they own, never the input, and tell the truth when the
system refuses: each attack is refused with exit 2 (or OutputError through the API)
and nothing outside the output is touched."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import tnsurgery
from tests.security.helpers import RANK4, ROOT, invoke, plain_mlp, refused, tree
from tnsurgery import io
from tnsurgery.errors import OutputError

transformers = pytest.importorskip("transformers")


def small():
    return tnsurgery.surgery.apply(plain_mlp(), RANK4)


def spec_file(tmp_path: Path, spec=RANK4) -> Path:
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    return p


def tiny_gpt2_dir(path: Path) -> Path:
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(path)
    return path


def hf_spec(tmp_path: Path) -> Path:
    # an embedding-free spec that matches nothing is not wanted: use --allow-empty
    return spec_file(
        tmp_path,
        {
            "version": 1,
            "rules": [{"match": "nothing*", "transform": "factorize", "params": {"rank": 2}}],
        },
    )


# ------------------------------------------------------------------ save()


def test_save_never_replaces_an_unrelated_directory(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputError, match="not a tnsurgery output"):
        tnsurgery.save(small(), precious)
    assert tree(precious) == {"cat.jpg": b"meow"}
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputError, match="is a file"):
        tnsurgery.save(small(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


def test_save_replaces_its_own_earlier_output(tmp_path):
    tnsurgery.save(small(), tmp_path / "out")
    tnsurgery.save(small(), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_never_replaces_an_unrelated_safetensors_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="not part of an earlier tnsurgery output"):
        tnsurgery.save(small(), tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == b"someone else's"
    (tmp_path / "v.manifest.json").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        tnsurgery.save(small(), tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


# ------------------------------------------------------- the CLI's outputs


def test_an_output_file_taken_by_something_else_is_exit_2(tmp_path):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    (tmp_path / "out.pt").write_bytes(b"my notes")
    r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", tmp_path / "out.pt")
    refused(r, "out.pt", "not part of an earlier tnsurgery output")
    assert (tmp_path / "out.pt").read_bytes() == b"my notes"
    (tmp_path / "out.pt").unlink()
    (tmp_path / "out.manifest.json").mkdir()  # was: Internal error: IsADirectoryError
    before = tree(tmp_path)
    r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", tmp_path / "out.pt")
    refused(r, "out.manifest.json", "is a directory")
    assert tree(tmp_path) == before


def test_a_rerun_replaces_its_own_output(tmp_path):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    for _ in range(2):
        r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", tmp_path / "out.pt")
        assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert set(manifest["files"]) == {"out.pt", "out.safetensors"}
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())


def test_an_hf_input_is_never_deleted_through_its_parent(tmp_path):
    """parent/base applied with -o parent, where parent/ holds an earlier manifest.json:
    was exit 0 and parent/base gone."""
    parent = tmp_path / "parent"
    tiny_gpt2_dir(parent / "base")
    (parent / "manifest.json").write_text(json.dumps({"format": "tnsurgery.manifest"}))
    before = tree(parent)
    r = invoke("apply", hf_spec(tmp_path), parent / "base", "-o", parent, "--allow-empty")
    refused(r, "would overwrite the input")
    assert tree(parent) == before


def test_a_state_dict_input_is_never_redefined(tmp_path, monkeypatch):
    """s/sd.pt with its pair, applied again with -o s/sd.bin: was exit 0, and the
    input's manifest and weights replaced (it then loaded as another model)."""
    monkeypatch.chdir(ROOT)
    s = tmp_path / "s"
    s.mkdir()
    torch.save(plain_mlp().state_dict(), tmp_path / "orig.pt")
    arch = "tests.security.helpers:plain_mlp"
    r = invoke(
        "apply", spec_file(tmp_path), tmp_path / "orig.pt", "--arch", arch, "-o", s / "sd.pt"
    )
    assert r.exit_code == 0, r.output
    before = tree(s)
    r = invoke("apply", spec_file(tmp_path), s / "sd.pt", "--arch", arch, "-o", s / "sd.bin")
    refused(r, "would overwrite the input")
    assert tree(s) == before


def test_the_output_never_overwrites_the_teacher_or_the_spec(tmp_path):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    torch.save(plain_mlp(1), tmp_path / "teacher.pt")
    spec = spec_file(
        tmp_path,
        {
            **RANK4,
            "training": {"data": {"source": "random", "shape": [16], "samples": 8}, "steps": 1},
        },
    )
    before = tree(tmp_path)
    for out in ("teacher.pt", "spec.json"):
        r = invoke(
            "apply",
            spec,
            tmp_path / "in.pt",
            "--teacher",
            tmp_path / "teacher.pt",
            "-o",
            tmp_path / out,
        )
        refused(r, "would overwrite the input")
    assert tree(tmp_path) == before


# --------------------------------------------------------------- symlinks


@pytest.mark.parametrize("what", ["file", "dir"])
def test_symlinks_out_of_an_hf_input_are_not_followed(tmp_path, what):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY")
    base = tiny_gpt2_dir(tmp_path / "in" / "base")
    if what == "file":
        (base / "notes.txt").symlink_to(secret / "id_rsa")
    else:
        (base / "assets").symlink_to(secret)
    out = tmp_path / "out"
    r = invoke("apply", hf_spec(tmp_path), base, "-o", out, "--allow-empty")
    refused(r, "symbolic link", "outside the input directory")
    assert not out.exists()
    assert not any(
        "PRIVATE" in p.read_text(errors="ignore")
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and p.parent != secret
    )


def test_links_inside_the_input_and_hub_cache_links_are_followed(tmp_path):
    repo = tmp_path / "models--x--tiny"
    snap = tiny_gpt2_dir(repo / "snapshots" / "abc")
    (repo / "blobs").mkdir()
    shutil.move(snap / "config.json", repo / "blobs" / "123")
    (snap / "config.json").symlink_to(Path("../../blobs/123"))
    (snap / "README.md").write_text("a model")
    (snap / "readme.txt").symlink_to("README.md")
    out = tmp_path / "out"
    r = invoke("apply", hf_spec(tmp_path), snap, "-o", out, "--allow-empty")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
    assert (out / "readme.txt").read_text() == "a model"


# ------------------------------------------------------------ exit codes


def test_a_read_only_output_directory_is_exit_2(tmp_path, monkeypatch):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: the system's answer, simulated
        real = tempfile.mkstemp

        def read_only(*args, **kwargs):
            if Path(kwargs.get("dir", ".")) == ro:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    ro.chmod(0o555)
    try:
        r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", ro / "out.pt")
        refused(r, "cannot write", str(ro / "out.pt"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_disk_full_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    before = tree(tmp_path)

    def full(*args, **kwargs):
        Path(str(args[1])).write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.pairs, "save_file", full)
    r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", tmp_path / "out.pt")
    refused(r, "cannot write", "No space left on device")
    assert tree(tmp_path) == {**before, "spec.json": (tmp_path / "spec.json").read_bytes()}


def test_stale_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    torch.save(plain_mlp(), tmp_path / "in.pt")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [
        tmp_path / f".out.pt.tnsurgery-{dead}-abc.tmp",
        tmp_path / f".out.safetensors.tnsurgery-{dead}-def.tmp",
    ]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.pt.tnsurgery-{os.getpid()}-zzz.tmp"
    alive.write_bytes(b"mine")
    r = invoke("apply", spec_file(tmp_path), tmp_path / "in.pt", "-o", tmp_path / "out.pt")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale)
    assert alive.exists()  # a live process's temp file is never touched
