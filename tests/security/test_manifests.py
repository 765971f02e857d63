"""Manifests are validated documents: every attack on a saved model's manifest is
refused with a ModelLoadError naming the file and the field (exit 2 through the
CLI), before anything is allocated or imported."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tnsurgery
from tests.security.helpers import ROOT, edit_manifest, invoke, plain_mlp, refused, surgered_dir
from tnsurgery.errors import ModelLoadError


def load(path: Path):
    return tnsurgery.load(path, plain_mlp())


def test_a_good_output_loads(tmp_path):
    out = surgered_dir(tmp_path)
    model = load(out)
    x = torch.randn(3, 16)
    expected = tnsurgery.surgery.apply(plain_mlp(), json.loads(json.dumps(_rank4())))
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def _rank4():
    from tests.security.helpers import RANK4

    return RANK4


@pytest.mark.parametrize(
    "weights",
    ["../outside/x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "", 5, None],
)
def test_the_weights_field_stays_in_the_manifest_directory(tmp_path, weights):
    out = surgered_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(out / "model.safetensors", outside / "x.safetensors")
    edit_manifest(out / "manifest.json", weights=weights)
    with pytest.raises(ModelLoadError) as info:
        load(out)
    assert "manifest.json" in str(info.value) and "weights" in str(info.value)


def test_a_weights_symlink_leading_out_is_refused(tmp_path):
    out = surgered_dir(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(out / "model.safetensors", outside / "w.safetensors")
    (out / "model.safetensors").symlink_to(outside / "w.safetensors")
    with pytest.raises(ModelLoadError, match="leads out"):
        load(out)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"history": "not a list"}, "history"),
        ({"replacements": {}}, "replacements"),
        ({"replacements": [{"layer": "x"}]}, "replacements.0.name"),
        ({"aliases": ["a"]}, "aliases"),
        ({"files": ["a"]}, "files"),
        ({"format_version": 99}, "newer tnsurgery"),
        ({"format_version": "x"}, "format_version"),
        ({"format": "other"}, "format"),
        ({"output_error": "abc"}, "output_error"),
    ],
)
def test_malformed_fields_name_the_file_and_the_field(tmp_path, change, named):
    out = surgered_dir(tmp_path)
    edit_manifest(out / "manifest.json", **change)
    with pytest.raises(ModelLoadError) as info:
        load(out)
    assert str(out / "manifest.json") in str(info.value)
    assert named in str(info.value)


def _set_config(path: Path, **config) -> None:
    raw = json.loads(path.read_text())
    raw["replacements"][0]["config"].update(config)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("rank", ["abc", -3, 0, 10**12, 10**9, [1, 2], None, 2.5])
def test_a_layer_config_is_checked_against_the_weights_before_allocation(tmp_path, rank):
    out = surgered_dir(tmp_path)
    _set_config(out / "manifest.json", rank=rank)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load(out)
    assert time.perf_counter() - start < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"loading a hostile manifest grew memory by {grown_mb:.0f} MB"
    msg = str(info.value)
    assert "manifest.json" in msg and "replacements" in msg, msg


def test_a_huge_rank_through_the_cli_exits_2(tmp_path, in_repo_root_models):
    out = surgered_dir(tmp_path)
    _set_config(out / "manifest.json", rank=10**9)
    result = invoke("inspect", out, "--arch", "tests.security.helpers:plain_mlp")
    refused(result, "manifest.json", "replacements")


@pytest.fixture
def in_repo_root_models(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_an_embedded_manifest_is_checked_like_a_sidecar(tmp_path):
    small = tnsurgery.surgery.apply(plain_mlp(), _rank4())
    path = tnsurgery.save(small, tmp_path / "w.safetensors")
    (tmp_path / "w.manifest.json").unlink()  # only the copy inside the file is left
    assert isinstance(load(path)[0], type(small[0]))
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        embedded = json.loads(f.metadata()["tnsurgery_manifest"])
    for change in ({"format": "evil"}, {"format_version": 42}, {"history": "x"}):
        bad = {**embedded, **change}
        save_file(tensors, str(path), metadata={"tnsurgery_manifest": json.dumps(bad)})
        with pytest.raises(ModelLoadError) as info:
            load(path)
        assert str(path) in str(info.value)
    no_format = {k: v for k, v in embedded.items() if k != "format"}
    save_file(tensors, str(path), metadata={"tnsurgery_manifest": json.dumps(no_format)})
    with pytest.raises(ModelLoadError, match="not a tnsurgery manifest"):
        load(path)
    save_file(tensors, str(path), metadata={"tnsurgery_manifest": "{not json"})
    with pytest.raises(ModelLoadError, match="unreadable manifest"):
        load(path)


def test_deeply_nested_and_oversized_manifests_are_refused(tmp_path):
    out = surgered_dir(tmp_path)
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match="manifest"):
        load(out)
    out2 = surgered_dir(tmp_path, "out2")
    raw = json.loads((out2 / "manifest.json").read_text())
    raw["output_error"] = 1
    text = json.dumps(raw).replace('"output_error": 1', '"output_error": ' + "9" * 5000)
    (out2 / "manifest.json").write_text(text)
    with pytest.raises(ModelLoadError, match="manifest"):
        load(out2)


def test_a_layer_no_plugin_provides_is_never_imported(tmp_path):
    out = surgered_dir(tmp_path)
    raw = json.loads((out / "manifest.json").read_text())
    raw["replacements"][0]["layer"] = "os.system"
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="not provided by any installed plugin"):
        load(out)


def test_a_mixed_output_set_is_refused(tmp_path):
    """A crash between renames leaves a new file beside an earlier run's manifest:
    the manifest lists each file's size and hash, so the set is refused."""
    torch.save(plain_mlp(), tmp_path / "in.pt")
    assert (
        invoke("apply", _spec(tmp_path, 4), tmp_path / "in.pt", "-o", tmp_path / "o.pt").exit_code
        == 0
    )
    first = (tmp_path / "o.pt").read_bytes()
    assert (
        invoke("apply", _spec(tmp_path, 6), tmp_path / "in.pt", "-o", tmp_path / "x.pt").exit_code
        == 0
    )
    # as if the second run had been killed after renaming only its main file
    shutil.copy(tmp_path / "x.pt", tmp_path / "o.pt")
    for path in (tmp_path / "o.pt", tmp_path / "o.safetensors"):
        refused(
            invoke("inspect", path, "--arch", "tests.security.helpers:plain_mlp"),
            "incomplete or mixed",
        )
    (tmp_path / "o.pt").write_bytes(first)
    assert invoke("inspect", tmp_path / "o.pt").exit_code == 0


def _spec(tmp_path: Path, rank: int) -> Path:
    p = tmp_path / f"spec{rank}.json"
    p.write_text(
        json.dumps({"rules": [{"match": "0", "transform": "factorize", "params": {"rank": rank}}]})
    )
    return p


def test_train_without_teacher_uses_the_architecture_the_user_gives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "import torch\n"
        "def factory():\n    return torch.nn.Sequential(torch.nn.Linear(16, 32))\n"
    )
    torch.save(plain_mlp().state_dict(), tmp_path / "sd.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
                "training": {
                    "data": {"source": "random", "shape": [16], "samples": 32},
                    "steps": 2,
                },
            }
        )
    )
    arch = "tests.security.helpers:plain_mlp"
    r = invoke("apply", spec, "sd.pt", "--arch", arch, "-o", "small.pt")
    assert r.exit_code == 0, r.output
    # the surgered model is a state dict with its pair: loading it needs --arch
    # (given for the model). The manifest's recorded arch is rewritten to evil:factory.
    raw = json.loads(Path("small.manifest.json").read_text())
    raw["source"]["arch"] = "evil:factory"
    Path("small.manifest.json").write_text(json.dumps(raw))
    # --arch for MODEL is also the architecture the user gives again: used, evil never
    r = invoke("train", spec, "small.pt", "--arch", arch, "-o", "t.pt")
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    assert f"teacher: {(tmp_path / 'sd.pt').resolve()}" in r.output


def test_train_without_any_architecture_says_the_command(tmp_path, monkeypatch):
    """A surgered pickle whose source is a state dict: no architecture given by the
    user, so the recorded one (evil:factory) is shown, never imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    torch.save(plain_mlp().state_dict(), tmp_path / "sd.pt")
    small = tnsurgery.surgery.apply(plain_mlp(), _rank4())
    tnsurgery.manifest.record(
        small,
        "source",
        {
            "path": str(tmp_path / "sd.pt"),
            "kind": "state_dict",
            "arch": "evil:factory",
            "fingerprint": __import__("tnsurgery.cli.inputs").cli.inputs.fingerprint(
                tmp_path / "sd.pt"
            ),
        },
    )
    torch.save(small, tmp_path / "small.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
                "training": {"data": {"source": "random", "shape": [16], "samples": 32}},
            }
        )
    )
    r = invoke("train", spec, "small.pt")
    refused(r, "never runs code named in a manifest", "--teacher-arch evil:factory")
    assert not marker.exists()
    assert not (tmp_path / "small.trained.pt").exists()


def test_a_config_that_disagrees_with_the_weights_is_refused_before_building(tmp_path):
    out = surgered_dir(tmp_path)
    _set_config(out / "manifest.json", rank=3)
    with pytest.raises(ModelLoadError) as info:
        load(out)
    msg = str(info.value)
    assert "replacements[0].config" in msg and "do not agree" in msg, msg


@pytest.mark.parametrize(
    "aliases, message",
    [
        ({"2.made_up": "nope"}, "names nope, which is not stored"),
        ({"2.bias": "0.bias"}, "is also stored"),
    ],
)
def test_a_manifest_alias_must_name_a_stored_tensor_and_not_be_one(tmp_path, aliases, message):
    """tnsurgery.load checks aliases as from_pretrained does (one check before building):
    an alias could hide a missing tensor, or replace a stored one."""
    out = surgered_dir(tmp_path)
    edit_manifest(out / "manifest.json", aliases=aliases)
    with pytest.raises(ModelLoadError, match=message):
        tnsurgery.load(out, plain_mlp(1))
