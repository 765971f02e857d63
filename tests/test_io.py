"""io: manifest + safetensors pairs, safe loading of every input kind, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_model
from safetensors.torch import save_file
from torch import nn

import tnsurgery
from tnsurgery import io, surgery
from tnsurgery.cli.inputs import default_output
from tnsurgery.errors import ModelLoadError, OutputError, UserInputError
from tnsurgery.layers import LowRankConv2d, LowRankLinear
from tnsurgery.plugins import Registry

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models

ROOT = Path(__file__).resolve().parents[1]
MLP_SPEC = {
    "version": 1,
    "rules": [{"match": "fc*", "transform": "factorize", "params": {"rank": 4}}],
}
CNN_SPEC = {
    "version": 1,
    "rules": [{"match": ["conv*", "fc"], "transform": "factorize", "params": {"rank_ratio": 0.25}}],
}
BERT_SPEC = {
    "version": 1,
    "rules": [
        {
            "match": ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"],
            "types": ["Linear"],
            "transform": "factorize",
            "params": {"rank": 8},
        },
    ],
}


@pytest.fixture
def in_repo_root(monkeypatch):
    """``--arch tests.models:...`` imports relative to the working directory."""
    monkeypatch.chdir(ROOT)


tiny_bert = tiny_bert_model


def bert_input():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model: nn.Module, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# -------------------------------------------------------------- save -> load


@pytest.mark.parametrize(
    "factory,spec,shape",
    [
        (models.mlp, MLP_SPEC, (4, 16)),
        (models.cnn, CNN_SPEC, (2, 3, 16, 16)),
    ],
    ids=["mlp", "cnn"],
)
def test_save_then_load_gives_identical_outputs(factory, spec, shape, tmp_path):
    x = torch.randn(shape)
    small = surgery.apply(factory(), spec, x)
    written = tnsurgery.save(small, tmp_path / "out")
    assert written == tmp_path / "out"
    assert files_in(tmp_path) == {"out", "out/manifest.json", "out/model.safetensors"}
    # a fresh base with *other* weights: every weight must come from the file
    base = type(small)()
    back = tnsurgery.load(tmp_path / "out", base)
    assert back is base
    for name, module in small.named_modules():
        assert type(back.get_submodule(name)) is type(module), name
    assert_same_state(back, small)
    assert torch.equal(run(back, x), run(small, x))
    manifest = tnsurgery.get_manifest(back)
    assert manifest["replacements"] == tnsurgery.get_manifest(small)["replacements"]
    assert manifest["output_error"] == tnsurgery.get_manifest(small)["output_error"]
    assert "weights" not in manifest and "aliases" not in manifest


def test_conv_layers_come_back_as_conv_layers(tmp_path):
    small = surgery.apply(models.cnn(), CNN_SPEC)
    back = tnsurgery.load(tnsurgery.save(small, tmp_path / "cnn"), models.CNN())
    assert isinstance(back.conv1, LowRankConv2d) and isinstance(back.fc, LowRankLinear)
    assert back.conv2.config() == small.conv2.config()


def test_save_to_a_safetensors_file_writes_its_manifest_beside_it(tmp_path):
    small = surgery.apply(models.mlp(), MLP_SPEC)
    target = tmp_path / "small.safetensors"
    assert tnsurgery.save(small, target) == target
    assert files_in(tmp_path) == {"small.safetensors", "small.manifest.json"}
    sidecar = json.loads((tmp_path / "small.manifest.json").read_text())
    assert sidecar["weights"] == "small.safetensors"
    assert sidecar["format"] == "tnsurgery.manifest"
    x = torch.randn(3, 16)
    for path in (target, tmp_path / "small.manifest.json"):
        back = tnsurgery.load(path, models.MLP())
        assert torch.equal(run(back, x), run(small, x))
    # the manifest also travels inside the safetensors metadata
    (tmp_path / "small.manifest.json").unlink()
    assert torch.equal(run(tnsurgery.load(target, models.MLP()), x), run(small, x))


def test_save_and_load_a_bert_built_from_a_config(tmp_path):
    x = bert_input()
    small = surgery.apply(tiny_bert(seed=0), BERT_SPEC, x)
    tnsurgery.save(small, tmp_path / "bert")
    back = tnsurgery.load(tmp_path / "bert", tiny_bert(seed=1))
    assert isinstance(back.encoder.layer[1].output.dense, LowRankLinear)
    out, ref = run(back, x), run(small, x)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)


def test_shared_tensors_are_stored_once_and_come_back_shared(tmp_path):
    small = surgery.apply(
        models.tied(),
        {
            "version": 1,
            "rules": [{"match": "other", "transform": "factorize", "params": {"rank": 4}}],
        },
    )
    tnsurgery.save(small, tmp_path / "tied")
    manifest = json.loads((tmp_path / "tied" / "manifest.json").read_text())
    assert manifest["aliases"] == {"dec.weight": "enc.weight"}
    back = tnsurgery.load(tmp_path / "tied", models.Tied())
    assert back.dec.weight is back.enc.weight
    x = torch.randn(2, 32)
    assert torch.equal(run(back, x), run(small, x))


def test_saving_a_model_that_was_not_surgered_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match="not surgered"):
        tnsurgery.save(models.mlp(), tmp_path / "out")
    assert files_in(tmp_path) == set()


def test_load_refuses_a_layer_no_plugin_provides_and_leaves_the_base_alone(tmp_path):
    tnsurgery.save(surgery.apply(models.mlp(), MLP_SPEC), tmp_path / "out")
    base = models.mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ModelLoadError, match="LowRankLinear.*not provided by any installed"):
        tnsurgery.load(tmp_path / "out", base, registry=Registry())
    assert all(type(m) is nn.Linear for m in (base.fc1, base.fc2, base.fc3))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_load_with_weights_that_do_not_fit_leaves_the_base_as_it_was(tmp_path):
    one_rule = {
        "version": 1,
        "rules": [{"match": "fc1", "transform": "factorize", "params": {"rank": 4}}],
    }
    tnsurgery.save(surgery.apply(models.mlp(), one_rule), tmp_path / "out")
    base = models.MLP()
    base.fc3 = nn.Linear(48, 10)  # fc3 does not fit; fc2 does, but must not be half-loaded
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ModelLoadError, match="do not fit"):
        tnsurgery.load(tmp_path / "out", base)
    assert type(base.fc1) is nn.Linear
    assert base.state_dict().keys() == before.keys()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_on_the_wrong_architecture_is_a_clean_error(tmp_path):
    tnsurgery.save(surgery.apply(models.mlp(), MLP_SPEC), tmp_path / "out")
    base = models.cnn()
    with pytest.raises(ModelLoadError, match="fc1"):
        tnsurgery.load(tmp_path / "out", base)
    assert type(base.fc) is nn.Linear


# ---------------------------------------------------------------- load_model


def test_a_pickled_module_of_torch_nn_classes_loads_by_default(tmp_path):
    model = models.plain_mlp()
    torch.save(model, tmp_path / "plain.pt")
    loaded = io.load_model(tmp_path / "plain.pt")
    assert loaded.kind == "pickle" and loaded.path == tmp_path / "plain.pt"
    assert type(loaded.model) is nn.Sequential
    x = torch.randn(3, 16)
    assert torch.equal(run(loaded.model, x), run(model, x))


def test_a_pickled_custom_class_is_refused_naming_the_class_and_the_flags(tmp_path):
    torch.save(models.mlp(), tmp_path / "custom.pt")
    with pytest.raises(ModelLoadError) as info:
        io.load_model(tmp_path / "custom.pt")
    msg = str(info.value)
    assert "tests.models.MLP" in msg
    assert "--trust-pickle" in msg and "--allow-class" in msg
    # only the untrusted class is listed: the torch.nn ones it also needs are allowed
    assert msg.split("not trusted by default: ")[1].split(". If you trust")[0] == (
        "tests.models.MLP"
    )


@pytest.mark.parametrize(
    "how",
    [
        {"trust_pickle": True},
        {"allow_classes": ["tests.models.MLP"]},
        {"allow_classes": ("tests.models",)},  # a package prefix
    ],
)
def test_a_pickled_custom_class_loads_when_allowed(how, tmp_path):
    model = models.mlp()
    torch.save(model, tmp_path / "custom.pt")
    loaded = io.load_model(tmp_path / "custom.pt", **how)
    assert type(loaded.model) is models.MLP
    assert_same_state(loaded.model, model)


def test_allowing_another_class_does_not_allow_this_one(tmp_path):
    torch.save(models.mlp(), tmp_path / "custom.pt")
    with pytest.raises(ModelLoadError, match="tests.models.MLP"):
        io.load_model(tmp_path / "custom.pt", allow_classes=["tests.models.CNN"])


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"weight": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="system"):
        io.load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_state_dict_with_arch(tmp_path, in_repo_root):
    trained = models.MLP()  # random weights, unlike the factory's
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    loaded = io.load_model(tmp_path / "sd.pt", arch="tests.models:mlp")
    assert loaded.kind == "state_dict" and loaded.arch == "tests.models:mlp"
    assert type(loaded.model).__name__ == "MLP"
    assert_same_state(loaded.model, trained)
    with pytest.raises(ModelLoadError, match="--arch"):
        io.load_model(tmp_path / "sd.pt")


def test_a_safetensors_file_with_arch(tmp_path, in_repo_root):
    trained = models.CNN()
    save_file(trained.state_dict(), str(tmp_path / "cnn.safetensors"))
    loaded = io.load_model(tmp_path / "cnn.safetensors", arch="tests.models:cnn")
    assert loaded.kind == "safetensors"
    assert_same_state(loaded.model, trained)
    with pytest.raises(ModelLoadError, match="--arch"):
        io.load_model(tmp_path / "cnn.safetensors")


def test_weights_that_do_not_fit_the_arch(tmp_path, in_repo_root):
    save_file(models.CNN().state_dict(), str(tmp_path / "cnn.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        io.load_model(tmp_path / "cnn.safetensors", arch="tests.models:mlp")


@pytest.mark.parametrize(
    "arch,message",
    [
        ("tests.models.mlp", "pkg.module:factory"),
        ("tests.models:nothing", "cannot import"),
        ("tests.nowhere:mlp", "cannot import"),
        ("tests.models:broken", "the factory failed: RuntimeError"),
        ("builtins:dict", "not an nn.Module"),
    ],
)
def test_bad_arch_is_a_user_error(arch, message, tmp_path, in_repo_root):
    save_file(models.MLP().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(UserInputError, match=message):
        io.load_model(tmp_path / "w.safetensors", arch=arch)


def test_a_hugging_face_directory(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    loaded = io.load_model(tmp_path / "bert")
    assert loaded.kind == "hf"
    assert type(loaded.model) is type(model)
    x = bert_input()
    assert torch.equal(run(loaded.model, x).last_hidden_state, run(model, x).last_hidden_state)


def test_a_truncated_pt_file_is_a_clean_error(tmp_path):
    torch.save(models.plain_mlp(), tmp_path / "m.pt")
    truncate(tmp_path / "m.pt")
    with pytest.raises(ModelLoadError) as info:
        io.load_model(tmp_path / "m.pt")
    assert str(tmp_path / "m.pt") in str(info.value)
    assert "truncated" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_truncated_safetensors_file_is_a_clean_error(tmp_path, in_repo_root):
    save_file(models.MLP().state_dict(), str(tmp_path / "m.safetensors"))
    truncate(tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError) as info:
        io.load_model(tmp_path / "m.safetensors", arch="tests.models:mlp")
    assert str(tmp_path / "m.safetensors") in str(info.value)
    assert "truncated" in str(info.value)


def test_missing_and_non_model_inputs_are_clean_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        io.load_model(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        io.load_model(tmp_path / "empty")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="not a model or a state dict"):
        io.load_model(tmp_path / "list.pt")


# ----------------------------------------------------------- save_like_input


def test_pickle_in_pickle_out_with_the_pair(tmp_path):
    model, x = models.plain_mlp(), torch.randn(4, 16)
    torch.save(model, tmp_path / "in.pt")
    loaded = io.load_model(tmp_path / "in.pt")
    small = surgery.apply(
        loaded.model,
        {
            "version": 1,
            "rules": [
                {"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 4}}
            ],
        },
        x,
    )
    out = default_output(loaded)
    assert out == tmp_path / "in.surgered.pt"
    written = io.save_like_input(small, loaded, out)
    assert written == [
        out,
        tmp_path / "in.surgered.manifest.json",
        tmp_path / "in.surgered.safetensors",
    ]
    assert files_in(tmp_path) == {
        "in.pt",
        "in.surgered.pt",
        "in.surgered.manifest.json",
        "in.surgered.safetensors",
    }
    again = io.load_model(out)  # tnsurgery layers are trusted: no flag needed
    assert again.kind == "pickle"
    assert isinstance(again.model[0], LowRankLinear)
    assert torch.equal(run(again.model, x), run(small, x))
    assert (
        tnsurgery.get_manifest(again.model)["replacements"]
        == (tnsurgery.get_manifest(small)["replacements"])
    )
    # the pair rebuilds it without unpickling anything
    back = tnsurgery.load(tmp_path / "in.surgered.safetensors", models.plain_mlp())
    assert torch.equal(run(back, x), run(small, x))


def test_state_dict_in_state_dict_out(tmp_path, in_repo_root):
    torch.save(models.mlp().state_dict(), tmp_path / "sd.pt")
    loaded = io.load_model(tmp_path / "sd.pt", arch="tests.models:mlp")
    small = surgery.apply(loaded.model, MLP_SPEC)
    written = io.save_like_input(small, loaded, tmp_path / "small.pt")
    assert [p.name for p in written] == ["small.pt", "small.manifest.json", "small.safetensors"]
    state = torch.load(tmp_path / "small.pt", weights_only=True)
    assert set(state) == set(small.state_dict())
    again = io.load_model(tmp_path / "small.pt", arch="tests.models:mlp")
    assert isinstance(again.model.fc1, LowRankLinear)
    x = torch.randn(2, 16)
    assert torch.equal(run(again.model, x), run(small, x))


def test_safetensors_in_safetensors_out(tmp_path, in_repo_root):
    save_file(models.mlp().state_dict(), str(tmp_path / "w.safetensors"))
    loaded = io.load_model(tmp_path / "w.safetensors", arch="tests.models:mlp")
    small = surgery.apply(loaded.model, MLP_SPEC)
    out = default_output(loaded)
    assert out == tmp_path / "w.surgered.safetensors"
    written = io.save_like_input(small, loaded, out)
    assert written == [out, tmp_path / "w.surgered.manifest.json"]
    again = io.load_model(out, arch="tests.models:mlp")
    x = torch.randn(2, 16)
    assert torch.equal(run(again.model, x), run(small, x))
    with pytest.raises(UserInputError, match="must be too"):
        io.save_like_input(small, loaded, tmp_path / "w2.pt")


def test_hugging_face_in_hugging_face_directory_out(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    loaded = io.load_model(tmp_path / "bert")
    x = bert_input()
    small = surgery.apply(loaded.model, BERT_SPEC, x)
    out = default_output(loaded)
    assert out == tmp_path / "bert-surgered"
    assert io.save_like_input(small, loaded, out) == [out]
    assert files_in(out) == {"config.json", "vocab.txt", "manifest.json", "model.safetensors"}
    again = io.load_model(out)
    assert again.kind == "hf"
    assert isinstance(again.model.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert torch.equal(run(again.model, x).last_hidden_state, run(small, x).last_hidden_state)


def test_the_input_is_never_overwritten(tmp_path):
    torch.save(models.plain_mlp(), tmp_path / "in.pt")
    original = (tmp_path / "in.pt").read_bytes()
    loaded = io.load_model(tmp_path / "in.pt")
    small = surgery.apply(
        loaded.model,
        {"version": 1, "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}]},
    )
    for out in (tmp_path / "in.pt", tmp_path / "." / "in.pt"):
        with pytest.raises(UserInputError, match="overwrite the input"):
            io.save_like_input(small, loaded, out)
    assert (tmp_path / "in.pt").read_bytes() == original
    assert files_in(tmp_path) == {"in.pt"}


def test_the_input_directory_is_never_written_into(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bert")
    before = files_in(tmp_path)
    loaded = io.load_model(tmp_path / "bert")
    small = surgery.apply(loaded.model, BERT_SPEC)
    for out in (tmp_path / "bert", tmp_path / "bert" / "inside"):
        with pytest.raises(UserInputError, match="overwrite the input"):
            io.save_like_input(small, loaded, out)
    assert files_in(tmp_path) == before


def _fail_midway(real_write_path_arg: int = 1):
    """A stand-in for a writer that writes part of its file, then fails."""

    def writer(*args, **kwargs):
        target = Path(str(args[real_write_path_arg]))
        target.write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    return writer


@pytest.mark.parametrize("fail", ["torch.save", "save_file"])
def test_a_failed_pickle_write_leaves_no_file(fail, tmp_path, monkeypatch):
    torch.save(models.plain_mlp(), tmp_path / "in.pt")
    loaded = io.load_model(tmp_path / "in.pt")
    small = surgery.apply(
        loaded.model,
        {"version": 1, "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}]},
    )
    io.save_like_input(small, loaded, tmp_path / "out.pt")  # an earlier output
    older = {f: (tmp_path / f).read_bytes() for f in files_in(tmp_path)}
    before = files_in(tmp_path)
    if fail == "torch.save":
        monkeypatch.setattr(torch, "save", _fail_midway())
    else:
        monkeypatch.setattr(io.pairs, "save_file", _fail_midway())
    with pytest.raises(OutputError, match="simulated"):
        io.save_like_input(small, loaded, tmp_path / "out.pt")
    assert files_in(tmp_path) == before
    assert {f: (tmp_path / f).read_bytes() for f in files_in(tmp_path)} == older


def test_a_failed_safetensors_write_leaves_no_file(tmp_path, monkeypatch, in_repo_root):
    save_file(models.mlp().state_dict(), str(tmp_path / "w.safetensors"))
    loaded = io.load_model(tmp_path / "w.safetensors", arch="tests.models:mlp")
    small = surgery.apply(loaded.model, MLP_SPEC)
    before = files_in(tmp_path)
    monkeypatch.setattr(io.pairs, "save_file", _fail_midway())
    with pytest.raises(OutputError, match="simulated"):
        io.save_like_input(small, loaded, tmp_path / "out.safetensors")
    with pytest.raises(OutputError, match="simulated"):
        tnsurgery.save(small, tmp_path / "pair.safetensors")
    with pytest.raises(OutputError, match="simulated"):
        tnsurgery.save(small, tmp_path / "pair")
    assert files_in(tmp_path) == before


def test_a_failed_hugging_face_write_leaves_no_directory(tmp_path, monkeypatch):
    tiny_bert().save_pretrained(tmp_path / "bert")
    loaded = io.load_model(tmp_path / "bert")
    small = surgery.apply(loaded.model, BERT_SPEC)
    before = files_in(tmp_path)
    monkeypatch.setattr(io.pairs, "save_file", _fail_midway())
    with pytest.raises(OutputError, match="simulated"):
        io.save_like_input(small, loaded, tmp_path / "out")
    assert files_in(tmp_path) == before


def test_outputs_get_ordinary_file_modes(tmp_path):
    small = surgery.apply(models.mlp(), MLP_SPEC)
    tnsurgery.save(small, tmp_path / "out")
    tnsurgery.save(small, tmp_path / "w.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    for p in (tmp_path / "out" / "model.safetensors", tmp_path / "w.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_hf_output_never_replaces_a_directory_that_is_not_ours(tmp_path):
    """The HF output directory is replaced whole: only an earlier tnsurgery output may be."""
    tiny_bert().save_pretrained(tmp_path / "bert")
    loaded = io.load_model(tmp_path / "bert")
    small = surgery.apply(loaded.model, BERT_SPEC)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a tnsurgery output"):
        io.save_like_input(small, loaded, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    io.save_like_input(small, loaded, tmp_path / "out")
    io.save_like_input(small, loaded, tmp_path / "out")  # an earlier output: replaced
    assert (tmp_path / "out" / "manifest.json").exists()


def test_file_output_that_is_a_directory_is_refused(tmp_path):
    torch.save(models.plain_mlp(), tmp_path / "m.pt")
    loaded = io.load_model(tmp_path / "m.pt")
    small = surgery.apply(
        loaded.model, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}]}
    )
    (tmp_path / "outdir").mkdir()
    with pytest.raises(UserInputError, match="is a directory"):
        io.save_like_input(small, loaded, tmp_path / "outdir")


def test_fingerprint_of_a_file_or_directory_follows_its_files(tmp_path):
    import os

    from tnsurgery.cli.inputs import fingerprint

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    first = fingerprint(d)
    assert fingerprint(d) == first and len(first) == 16
    os.utime(d / "model.safetensors", ns=(10**9, 10**9))
    assert fingerprint(d) != first
    f = tmp_path / "m.pt"
    f.write_bytes(b"abc")
    one = fingerprint(f)
    f.write_bytes(b"abcd")
    assert fingerprint(f) != one


def test_a_model_saved_before_the_restructuring_still_loads():
    """tests/data/v0_1_manifest was written by tnsurgery before issue 11 (commit fce5fa7):
    factorize, tt and qat (a history of three rules); it loads with the typed manifest
    and gives the outputs it gave then."""
    from safetensors.torch import load_file

    from tnsurgery.layers.qat import QATLayer
    from tnsurgery.layers.tt import TTLinear

    here = Path(__file__).parent / "data" / "v0_1_manifest"
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )
    model = tnsurgery.load(here / "model", base)
    assert isinstance(model[0], QATLayer) and isinstance(model[2], TTLinear)
    io_pair = load_file(str(here / "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io_pair["x"]), io_pair["y"], rtol=0, atol=0)
    manifest = tnsurgery.get_manifest(model)
    assert [r["transform"] for r in manifest["replacements"]] == ["factorize", "tt", "qat"]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("history", "not a list", "history"),
        ("replacements", [{"layer": "x"}], "replacements.0.name"),
        ("aliases", ["a"], "aliases"),
        ("format", "something.else", "format"),
    ],
)
def test_a_malformed_manifest_is_a_load_error_naming_the_field(tmp_path, field, value, named):
    here = Path(__file__).parent / "data" / "v0_1_manifest" / "model"
    out = tmp_path / "m"
    shutil.copytree(here, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw[field] = value
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError) as info:
        tnsurgery.load(out, nn.Sequential(nn.Linear(16, 32)))
    assert str(out / "manifest.json") in str(info.value) or str(out) in str(info.value)
    assert named in str(info.value) or "not a tnsurgery manifest" in str(info.value)


def test_manifest_json_keeps_infinite_errors_and_stringifies_what_json_cannot_hold():
    from tnsurgery.manifest import Manifest, Replacement

    rep = Replacement(name="a", layer="x.Y", config={"dtype": torch.float16, "n": 3})
    data = Manifest(replacements=[rep], output_error=float("inf")).to_dict()
    assert data["output_error"] == float("inf")
    assert data["replacements"][0]["config"] == {"dtype": "torch.float16", "n": 3}
    assert json.loads(json.dumps(data))["output_error"] == float("inf")
