"""Model files and directories run no code: the pickle allow list is the layer classes
and the torch.nn module classes (classes only, rebuilt only the way torch.save writes
them), and a Hugging Face directory never runs its own Python nor any callable its
config names."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_model
from torch import nn

import tnsurgery
from tests.security.helpers import RANK4, invoke, plain_mlp, refused
from tnsurgery import io
from tnsurgery.errors import ModelLoadError

# ------------------------------------------------------------------ pickles


def test_torch_nn_models_and_surgered_models_load_by_default(tmp_path):
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4), nn.GELU(), nn.Conv1d(1, 2, 3), nn.Embedding(3, 4)
    )
    torch.save(model, tmp_path / "m.pt")
    assert type(io.load_model(tmp_path / "m.pt").model) is nn.Sequential
    qat = tnsurgery.surgery.apply(
        plain_mlp(), {"rules": [{"match": "0", "transform": "qat", "params": {"bits": 4}}]}
    )
    torch.save(qat, tmp_path / "q.pt")
    io.load_model(tmp_path / "q.pt")


def test_tnsurgery_classes_that_are_not_layers_are_not_trusted(tmp_path):
    """A tnsurgery.datasource.DataContext was rebuilt from a pickle with no flag."""
    from tnsurgery.datasource import DataContext

    obj = DataContext.__new__(DataContext)
    torch.save({"x": obj}, tmp_path / "ctx.pt")
    with pytest.raises(ModelLoadError, match="DataContext"):
        io.load_model(tmp_path / "ctx.pt")


def test_allow_class_allows_classes_never_functions(tmp_path):
    class Call:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"x": Call()}, tmp_path / "f.pt")
    with pytest.raises(ModelLoadError, match="allows classes only"):
        io.load_model(tmp_path / "f.pt", allow_classes=["posix", "os"])


def _reduce_linear(path: Path, n: int) -> None:
    class Evil:
        def __reduce__(self):
            return (nn.Linear, (n, n))

    torch.save(Evil(), path)


def test_a_tiny_pickle_that_calls_a_module_class_is_refused_before_allocating(tmp_path):
    """1.3 KB reducing to nn.Linear(16000, 16000) allocated 1 GB with no flag."""
    _reduce_linear(tmp_path / "bomb.pt", 16000)
    assert (tmp_path / "bomb.pt").stat().st_size < 2000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="calls torch.nn.modules.linear.Linear"):
        io.load_model(tmp_path / "bomb.pt")
    assert time.perf_counter() - start < 2
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200
    refused(invoke("inspect", tmp_path / "bomb.pt"), "bomb.pt", "--trust-pickle")


def test_a_pickle_naming_main_never_imports_it(tmp_path):
    """tnsurgery.__main__.X made tnsurgery import __main__, which re-ran the CLI."""
    torch.save(plain_mlp(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    # rename a class reference in the pickle to one that lives in tnsurgery.__main__
    old = b"torch.nn.modules.container\nSequential"
    assert old in data
    import zipfile

    src = zipfile.ZipFile(tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as out:
        for info in src.infolist():
            content = src.read(info)
            if info.filename.endswith("data.pkl"):
                content = content.replace(old, b"tnsurgery.__main__\nSequentia")
            out.writestr(info, content)
    sys.modules.pop("tnsurgery.__main__", None)
    for allow in ((), ("tnsurgery",)):
        with pytest.raises(ModelLoadError, match="__main__"):
            io.load_model(tmp_path / "evil.pt", allow_classes=allow)
    assert "tnsurgery.__main__" not in sys.modules


def test_a_class_saved_from_a_script_says_what_to_do(tmp_path):
    code = (
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.fc = torch.nn.Linear(2, 2)\n"
        f"torch.save(Net(), {str(tmp_path / 'net.pt')!r})\n"
    )
    (tmp_path / "make.py").write_text(code)
    assert os.system(f"{sys.executable} {tmp_path / 'make.py'}") == 0
    with pytest.raises(ModelLoadError, match="define the class in a module"):
        io.load_model(tmp_path / "net.pt")


def test_trust_pickle_of_model_does_not_carry_over_to_a_teacher_its_manifest_names(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(1), "p": Payload()}, tmp_path / "teacher.pt")
    small = tnsurgery.surgery.apply(plain_mlp(), RANK4)
    from tnsurgery.cli.inputs import fingerprint

    tnsurgery.manifest.record(
        small,
        "source",
        {
            "path": str(tmp_path / "teacher.pt"),
            "kind": "pickle",
            "arch": None,
            "fingerprint": fingerprint(tmp_path / "teacher.pt"),
        },
    )
    torch.save(small, tmp_path / "small.pt")
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                **RANK4,
                "training": {"data": {"source": "random", "shape": [16], "samples": 8}},
            }
        )
    )
    r = invoke("train", "spec.json", "small.pt", "--trust-pickle")
    refused(r, "teacher.pt", "flags given for MODEL do not apply")
    assert not marker.exists()


# ------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def _bert_dir(path: Path) -> Path:
    tiny_bert_model().save_pretrained(path)
    return path


def test_a_directory_with_remote_code_never_runs_it(tmp_path):
    d = _bert_dir(tmp_path / "remote")
    marker = tmp_path / "PWNED"
    (d / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModel": "evil_model.Evil"}
    (d / "config.json").write_text(json.dumps(config))
    r = invoke("inspect", d, input="y\ny\ny\n")  # it used to ask on stdin, and 'y' ran it
    assert r.exit_code in (0, 2), r.output
    assert "Internal error" not in r.output
    assert not marker.exists()


@pytest.fixture(scope="module")
def surgered_bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    d = _bert_dir(tmp / "in")
    loaded = io.load_model(d)
    spec = {
        "rules": [
            {
                "match": "encoder.layer.*.intermediate.dense",
                "transform": "factorize",
                "params": {"rank": 2},
            }
        ]
    }
    io.save_like_input(tnsurgery.surgery.apply(loaded.model, spec), loaded, tmp / "out")
    return tmp / "out"


@pytest.mark.parametrize("name", ["pipeline", "set_seed", "AutoTokenizer", "os", "BertConfig"])
def test_architectures_name_only_model_classes(tmp_path, name, monkeypatch, surgered_bert):
    """With a manifest present, config.json's architectures could name any top-level
    transformers callable (pipeline, set_seed were called)."""
    out = tmp_path / "out"
    shutil.copytree(surgered_bert, out)
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = [name]
    (out / "config.json").write_text(json.dumps(config))
    called = []
    if hasattr(transformers, name) and name != "BertConfig":
        monkeypatch.setattr(transformers, name, lambda *a, **k: called.append(a))
    again = io.load_model(out)
    assert called == []
    assert isinstance(again.model, transformers.BertModel)


def test_every_transformers_load_sets_trust_remote_code_false():
    """Source check: each from_pretrained/from_config in tnsurgery says so."""
    root = Path(tnsurgery.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for i, line in enumerate(text.splitlines()):
            if "AutoConfig.from_pretrained(" in line or "AutoTokenizer.from_pretrained(" in line:
                window = "\n".join(text.splitlines()[i : i + 4])
                assert "trust_remote_code=False" in window, f"{path}:{i + 1}"


def test_a_calibration_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": torch.zeros(4, 16), "p": Payload()}, tmp_path / "calib.pt")
    spec = {
        **RANK4,
        "calibration": {"data": {"source": "tensors", "path": str(tmp_path / "calib.pt")}},
    }
    with pytest.raises(tnsurgery.UserInputError, match="calib.pt"):
        tnsurgery.surgery.apply(plain_mlp(), spec)
    assert not marker.exists()
