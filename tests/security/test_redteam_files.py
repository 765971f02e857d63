"""Attacks found by a red-team review after the first round of issue 12: each is
refused with exit 2 (or the project's error type), quickly, before allocating."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import tnsurgery
import tnsurgery.pickles
from tests.security.helpers import RANK4, invoke, plain_mlp, refused
from tnsurgery import io
from tnsurgery.errors import ModelLoadError
from tnsurgery.manifest import MANIFEST_ATTR

LINEAR = b"ctorch.nn.modules.linear\nLinear\n"


def with_pickle(tmp_path: Path, name: str, body: bytes, record: str = "data.pkl") -> Path:
    """A copy of a real torch.save file whose pickle record is ``body``."""
    torch.save(plain_mlp(), tmp_path / "base.pt")
    src = zipfile.ZipFile(tmp_path / "base.pt")
    out = tmp_path / name
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data, filename = src.read(info), info.filename
            if filename.endswith("data.pkl"):
                data, filename = body, filename[: -len("data.pkl")] + record
            z.writestr(filename, data)
    return out


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def refused_fast(path: Path, *words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        io.load_model(path)
    assert time.perf_counter() - start < 5
    for w in words:
        assert w in str(info.value), str(info.value)


def test_a_module_class_called_through_rebuild_from_type_is_refused(tmp_path):
    body = (
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n("
        + LINEAR
        + LINEAR
        + _int(12000)
        + _int(12000)
        + b"\x86}tR."
    )
    refused_fast(with_pickle(tmp_path, "h1.pt", body), "_rebuild_from_type_v2")


def test_a_pickle_record_in_upper_case_is_read_too(tmp_path):
    body = b"\x80\x02" + LINEAR + _int(12000) + _int(12000) + b"\x86R."
    refused_fast(with_pickle(tmp_path, "h2.pt", body, "DATA.PKL"), "Linear")


def test_a_call_of_bytearray_is_refused(tmp_path):
    body = b"\x80\x02cbuiltins\nbytearray\n" + _int(1_500_000_000) + b"\x85R."
    refused_fast(with_pickle(tmp_path, "h3.pt", body), "bytearray")


def test_a_module_whose_saved_state_is_costly_to_rebuild_is_cut_off(tmp_path, monkeypatch):
    """RNNBase.__setstate__ is quadratic in a num_layers read from the file."""
    m = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4))
    m[0].__dict__["_all_weights"] = [[0]]
    m[0].__dict__["num_layers"] = 200_000
    torch.save(m, tmp_path / "rnn.pt")
    monkeypatch.setattr(tnsurgery.pickles, "LOAD_SECONDS", 0.5)
    refused_fast(tmp_path / "rnn.pt", "took longer")


def test_a_stride_zero_tensor_is_refused(tmp_path):
    m = plain_mlp()
    m[0].weight = nn.Parameter(torch.zeros(1).expand(40000, 40000), requires_grad=False)
    torch.save(m, tmp_path / "s0.pt")
    refused_fast(tmp_path / "s0.pt", "stride 0")
    torch.save(torch.zeros(1).expand(40000, 40000), tmp_path / "x.pt")
    torch.save(plain_mlp(), tmp_path / "m.pt")
    (tmp_path / "spec.json").write_text(json.dumps(RANK4))
    r = invoke(
        "apply", tmp_path / "spec.json", tmp_path / "m.pt", "--sample-input", tmp_path / "x.pt"
    )
    refused(r, "stride 0")


def test_a_compressed_record_is_refused(tmp_path):
    torch.save(nn.Sequential(nn.Linear(1000, 1000)), tmp_path / "big.pt")
    src = zipfile.ZipFile(tmp_path / "big.pt")
    with zipfile.ZipFile(tmp_path / "z.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    refused_fast(tmp_path / "z.pt", "compressed")


def test_a_models_embedded_manifest_is_validated(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(RANK4))
    for name, manifest in (
        ("type.pt", {"format": "tnsurgery.manifest", "replacements": "x"}),
        ("notdict.pt", ["x"]),
        (
            "deep.pt",
            {"format": "tnsurgery.manifest", "spec": {"a": json.loads("[" * 150 + "]" * 150)}},
        ),
    ):
        m = plain_mlp()
        object.__setattr__(m, MANIFEST_ATTR, manifest)
        torch.save(m, tmp_path / name)
        r = invoke("apply", tmp_path / "spec.json", tmp_path / name, "-o", tmp_path / f"o{name}")
        refused(r, name)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2x5", ["fails on the sample input"]),
        ("int:2x16:0", ["upper bound"]),
        ("int:2x16:-3", ["upper bound"]),
        ("int:2x16:99999999999999999999999", ["upper bound"]),
        ("99999999999999999999x2", ["bad shape"]),
        ("100000x100000x100", ["more than"]),
    ],
)
def test_sample_inputs_the_model_cannot_take_are_exit_2(tmp_path, value, words):
    torch.save(plain_mlp(), tmp_path / "m.pt")
    (tmp_path / "spec.json").write_text(json.dumps(RANK4))
    r = invoke("apply", tmp_path / "spec.json", tmp_path / "m.pt", "--sample-input", value)
    refused(r, *words)


def test_dot_as_the_output_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(plain_mlp(), tmp_path / "m.pt")
    (tmp_path / "spec.json").write_text(json.dumps(RANK4))
    refused(invoke("apply", "spec.json", "m.pt", "-o", "."), "would overwrite the input")


def test_a_recorded_source_that_is_not_a_model_is_never_walked(tmp_path):
    small = tnsurgery.surgery.apply(plain_mlp(), RANK4)
    tnsurgery.manifest.record(small, "source", {"path": "/", "kind": "pickle", "fingerprint": "x"})
    torch.save(small, tmp_path / "small.pt")
    spec = {**RANK4, "training": {"data": {"source": "random", "shape": [16], "samples": 8}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    r = invoke("train", tmp_path / "spec.json", tmp_path / "small.pt", "-o", tmp_path / "t.pt")
    refused(r, "not a model file")
    assert time.perf_counter() - start < 10


def test_module_names_cannot_drive_the_terminal(tmp_path):
    m = nn.Sequential()
    m.add_module("\x1b]0;PWNED\x07\x1b[2Jevil", nn.Linear(16, 32))
    m.add_module("[bold]x[/bold]", nn.Linear(32, 8))
    torch.save(m, tmp_path / "ansi.pt")
    r = invoke("inspect", tmp_path / "ansi.pt")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\\x1b]0;PWNED" in r.output
    assert "[bold]x[/bold]" in r.output


transformers = pytest.importorskip("transformers")


def test_an_hf_config_far_larger_than_its_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "big"
    d.mkdir()
    config = transformers.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, vocab_size=30000
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(d)
    save_file({"unused": torch.zeros(1)}, str(d / "model.safetensors"))
    start = time.perf_counter()
    r = invoke("inspect", d)
    refused(r, "config.json describes a model")
    assert time.perf_counter() - start < 20
    (d / "manifest.json").write_text(json.dumps({"format": "tnsurgery.manifest"}))
    refused(invoke("inspect", d), "config.json describes a model")


def test_spec_named_training_files_stay_out_of_the_input(tmp_path):
    from conftest import tiny_bert_model

    tiny_bert_model().save_pretrained(tmp_path / "bert")
    before = sorted(p.name for p in (tmp_path / "bert").iterdir())
    spec = {
        "rules": [
            {"match": "**.intermediate.dense", "transform": "factorize", "params": {"rank": 4}}
        ],
        "training": {
            "data": {"source": "random", "shape": [8], "vocab_size": 64, "samples": 4},
            "steps": 1,
            "batch_size": 2,
            "log": str(tmp_path / "bert" / "train.log"),
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = invoke("apply", tmp_path / "spec.json", tmp_path / "bert", "-o", tmp_path / "out")
    refused(r, "training.log", "would overwrite the input")
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == before
    spec["training"]["log"] = str(tmp_path / "out" / "train.log")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = invoke("apply", tmp_path / "spec.json", tmp_path / "bert", "-o", tmp_path / "out")
    refused(r, "training.log")
    assert not (tmp_path / "out").exists()


def test_data_files_and_checkpoints_are_read_with_the_same_bounds(tmp_path):
    """The tensors data source and training checkpoints used torch's default allow list,
    which lets a 1 KB pickle call bytearray(1500000000)."""
    bomb = with_pickle(
        tmp_path, "calib.pt", b"\x80\x02cbuiltins\nbytearray\n" + _int(1_500_000_000) + b"\x85R."
    )
    spec = {**RANK4, "calibration": {"data": {"source": "tensors", "path": str(bomb)}}}
    with pytest.raises(tnsurgery.UserInputError, match="bytearray"):
        tnsurgery.surgery.apply(plain_mlp(), spec)
    ck = tmp_path / "ck"
    ck.mkdir()
    bomb.rename(ck / "last.pt")
    spec = {
        **RANK4,
        "training": {
            "data": {"source": "random", "shape": [16], "samples": 8},
            "steps": 2,
            "checkpoint": {"dir": str(ck), "every": 1},
        },
    }
    from tnsurgery.spec import load_spec
    from tnsurgery.training import train

    small = tnsurgery.surgery.apply(plain_mlp(), RANK4)
    with pytest.raises(tnsurgery.UserInputError, match="bytearray"):
        train(small, load_spec(spec).training, plain_mlp(), resume=True)


# ------------------------------------------------------------------ round 2


def test_a_manifest_of_a_million_values_is_refused_before_it_is_parsed(tmp_path):
    from tests.security.helpers import surgered_dir

    out = surgered_dir(tmp_path)
    raw = json.loads((out / "manifest.json").read_text())
    raw["not_replaced"] = [[]] * 1_100_000
    (out / "manifest.json").write_text(json.dumps(raw, separators=(",", ":")))
    with pytest.raises(ModelLoadError, match="more than 1,000,000 values"):
        tnsurgery.load(out, plain_mlp())


def test_a_huge_safetensors_header_is_refused_before_it_is_parsed(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"tnsurgery_manifest": "x" * 40_000_000})
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="header"):
        tnsurgery.load(path, plain_mlp())
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.complex64])
def test_weights_of_another_kind_than_the_model_holds_are_refused(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from tests.security.helpers import surgered_dir

    out = surgered_dir(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["2.weight"] = tensors["2.weight"].to(dtype)
    save_file(tensors, str(out / "model.safetensors"))
    raw = json.loads((out / "manifest.json").read_text())
    raw.pop("files")
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="2.weight is stored as"):
        tnsurgery.load(out, plain_mlp())


def test_a_legacy_pickle_says_so(tmp_path):
    torch.save(plain_mlp(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    refused_fast(tmp_path / "old.pt", "legacy")
    assert isinstance(io.load_model(tmp_path / "old.pt", trust_pickle=True).model, nn.Module)


def test_float8_weights_load_like_torch_saved_them(tmp_path):
    m = plain_mlp()
    m[0].weight = nn.Parameter(m[0].weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    torch.save(m, tmp_path / "f8.pt")
    assert io.load_model(tmp_path / "f8.pt").model[0].weight.dtype == torch.float8_e4m3fn


def test_an_hf_directory_whose_weights_belong_to_another_class_is_refused(tmp_path):
    from conftest import tiny_bert_model

    d = tmp_path / "bert"
    tiny_bert_model().save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100).to_dict()
    gpt2["architectures"] = ["GPT2Model"]
    (d / "config.json").write_text(json.dumps(gpt2))
    refused(invoke("inspect", d), "less than half of the parameters of GPT2Model")
    (d / "config.json").write_text(json.dumps(config))
    assert invoke("inspect", d).exit_code == 0


def test_a_huge_name_in_a_message_is_shortened(tmp_path):
    from tests.security.helpers import surgered_dir

    out = surgered_dir(tmp_path)
    raw = json.loads((out / "manifest.json").read_text())
    raw["replacements"][0]["name"] = ".".join(["a"] * 50_000)
    (out / "manifest.json").write_text(json.dumps(raw))
    r = invoke("inspect", out, "--arch", "tests.security.helpers:plain_mlp")
    refused(r)
    assert len(r.output) < 10_000 and "[…]" in r.output
