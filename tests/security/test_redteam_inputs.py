"""Issue "untrusted files stay data": a red team's inputs. Each is refused as a
:class:`~tnsurgery.errors.UserInputError` naming the file and what is wrong, quickly:
duplicate keys in a spec, a data source path that is a device, a FIFO or too large,
a training checkpoint that is malformed."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.security.helpers import invoke, plain_mlp, refused
from tnsurgery import data, surgery
from tnsurgery.builtins import data_sources
from tnsurgery.errors import DataSourceError, SpecError, UserInputError
from tnsurgery.spec import load_spec

YAML_TWICE = """\
version: 1
rules:
  - match: "0"
    transform: factorize
    params: {rank: 4}
    params: {rank: 8}
"""

JSON_TWICE = """\
{
  "version": 1,
  "rules": [
    {
      "match": "0", "transform": "factorize",
      "params": {"rank": 4},
      "params": {"rank": 8}
    }
  ]
}
"""


def spec_refused(path: Path, *words: str) -> None:
    """``load_spec`` and ``tnsurgery validate`` refuse the file, naming ``words``."""
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert time.perf_counter() - start < 1.0
    for w in words:
        assert w in str(info.value), str(info.value)
    refused(invoke("validate", path), *words)


# --- 1. duplicate keys ---------------------------------------------------------------


def test_yaml_duplicate_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(YAML_TWICE)
    spec_refused(path, "duplicate key 'params'", "first at line 5", "at line 6")
    flow = tmp_path / "flow.yaml"
    flow.write_text('version: 1\nrules: [{match: "0", transform: factorize, match: "1"}]\n')
    spec_refused(flow, "duplicate key 'match'", "line 2")


def test_yaml_merge_key_override_is_no_duplicate(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "version: 1\n"
        "base: &base {match: '0', transform: factorize, params: {rank: 4}}\n"
        "rules:\n"
        "  - <<: *base\n"
        "    params: {rank: 8}\n"
        "  - <<: *base\n"
        "    match: '2'\n"
    )
    with pytest.raises(SpecError) as info:  # 'base' is no spec field; no duplicate either
        load_spec(path)
    assert "duplicate" not in str(info.value) and "unknown field 'base'" in str(info.value)


def test_json_duplicate_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(JSON_TWICE)
    spec_refused(path, "not valid JSON", "duplicate key 'params'", "first at line 6", "line 7")
    nested = tmp_path / "nested.json"
    text = '{"version": 1, "rules": [{"params": {"rank": 1, "r\\u0061nk": 2}}]}'
    nested.write_text(text)
    column = text.index('"r\\u0061nk"') + 1  # the same key, spelled otherwise
    spec_refused(nested, "duplicate key 'rank'", f"line 1, column {column}")


# --- 2. data source paths ------------------------------------------------------------


def quickly(fn, seconds: float = 2.0) -> BaseException | None:
    """What ``fn()`` raises, within ``seconds`` (a daemon thread: a hang fails the test
    instead of blocking the run)."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


def first_batch(source: str, path: Path | str, **params) -> None:
    next(iter(data.batches({"source": source, "path": str(path), **params}, batch_size=2)))


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    yield path
    try:  # a reader blocked on it (a regression) is let go
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("source", ["text", "tensors"])
def test_device_as_data_path_is_refused(source):
    exc = quickly(lambda: first_batch(source, "/dev/zero"))
    assert isinstance(exc, DataSourceError), exc
    assert "not a regular file but a character device" in str(exc) and "/dev/zero" in str(exc)


@pytest.mark.parametrize("source", ["text", "tensors"])
def test_fifo_as_data_path_is_refused(source, fifo):
    exc = quickly(lambda: first_batch(source, fifo))
    assert isinstance(exc, DataSourceError), exc
    assert "not a regular file but a FIFO" in str(exc) and str(fifo) in str(exc)


@pytest.mark.parametrize("source", ["text", "tensors"])
def test_directory_as_data_path_is_refused_and_a_symlink_followed(source, tmp_path):
    exc = quickly(lambda: first_batch(source, tmp_path))
    assert isinstance(exc, DataSourceError) and "but a directory" in str(exc), exc
    (tmp_path / "t.pt").symlink_to("/dev/zero")
    exc = quickly(lambda: first_batch(source, tmp_path / "t.pt"))
    assert isinstance(exc, DataSourceError) and "character device" in str(exc), exc


def test_symlink_to_a_regular_file_is_read(tmp_path):
    torch.save(torch.ones(3, 2), tmp_path / "real.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "real.pt")
    got = list(data.batches({"source": "tensors", "path": str(tmp_path / "link.pt")}, batch_size=2))
    assert [b.shape[0] for b in got] == [2, 1]


def test_oversize_text_and_tensors_files_are_refused(tmp_path, monkeypatch):
    text = tmp_path / "lines.txt"
    text.write_text("a few words\n" * 4)  # 48 bytes
    monkeypatch.setattr(data_sources, "MAX_TEXT_BYTES", 40)
    exc = quickly(lambda: first_batch("text", text))
    assert isinstance(exc, DataSourceError), exc
    assert "48 bytes, more than the limit of 40" in str(exc) and str(text) in str(exc)
    monkeypatch.setattr(data_sources, "MAX_TEXT_BYTES", 1 << 20)
    monkeypatch.setattr(data_sources, "MAX_TEXT_LINES", 3)
    exc = quickly(lambda: first_batch("text", text))
    assert isinstance(exc, DataSourceError) and "more than 3 non-empty lines" in str(exc), exc
    tensors = tmp_path / "t.pt"
    torch.save(torch.zeros(64), tensors)
    monkeypatch.setattr(data_sources, "MAX_TENSORS_BYTES", 100)
    exc = quickly(lambda: first_batch("tensors", tensors))
    assert isinstance(exc, DataSourceError) and "more than the limit of 100" in str(exc), exc


def test_tokenizer_directory_with_a_fifo_is_refused(tmp_path, fifo):
    text = tmp_path / "lines.txt"
    text.write_text("hello\n")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").symlink_to(fifo)  # a link out of the directory, to a FIFO
    exc = quickly(lambda: first_batch("text", text, tokenizer=str(tok)))
    assert isinstance(exc, UserInputError), exc
    assert "tokenizer.json, a link out of the directory" in str(exc)
    (tok / "tokenizer.json").unlink()
    os.mkfifo(tok / "tokenizer.json")  # a FIFO in the directory itself
    exc = quickly(lambda: first_batch("text", text, tokenizer=str(tok)))
    assert isinstance(exc, UserInputError), exc
    assert "tokenizer.json, not a regular file but a FIFO" in str(exc)
    exc = quickly(lambda: first_batch("text", text, tokenizer=str(text)))
    assert isinstance(exc, UserInputError) and "is not a directory" in str(exc), exc


# --- 3. checkpoints ------------------------------------------------------------------


def training_spec(ckpt: Path) -> dict:
    return {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
        "training": {
            "data": {"source": "random", "shape": [16], "samples": 16},
            "steps": 2,
            "batch_size": 8,
            "checkpoint": {"every": 1, "dir": str(ckpt)},
        },
    }


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("good") / "ck"
    surgery.apply(plain_mlp(), training_spec(ckpt))
    return ckpt / "last.pt"


def _no_optimizer(p):
    del p["optimizer"]


def _bad_torch_rng(p):
    p["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _bad_python_rng(p):
    p["rng"]["python"] = (3, (1, 2), None)


def _bad_model(p):
    p["model"]["0.u"] = "not a tensor"


def _model_of_another_shape(p):
    p["model"]["0.u"] = torch.zeros(2, 2)


def _optimizer_state_of_another_shape(p):
    p["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)


def _optimizer_state_incomplete(p):
    del p["optimizer"]["state"][0]["exp_avg_sq"]


def _optimizer_groups_missing(p):
    p["optimizer"] = {"state": {}}


def _no_step(p):
    del p["state"]["step"]


def _bad_best_state(p):
    p["best_state"] = {"0.u": [1, 2]}


def _bad_losses(p):
    p["state"]["losses"] = "many"


def _not_a_dict(p):
    p.clear()
    p["payload"] = [1, 2]


MALFORMED = {
    "no optimizer": (_no_optimizer, "no 'optimizer' entry"),
    "bad rng.torch": (_bad_torch_rng, "'rng.torch' is not a torch generator state"),
    "bad rng.python": (_bad_python_rng, "'rng.python' is not a Python random state"),
    "bad model": (_bad_model, "'model' is not a dict of named tensors"),
    "model of another shape": (_model_of_another_shape, "does not fit this model"),
    "optimizer state shape": (_optimizer_state_of_another_shape, "'exp_avg' has shape [5]"),
    "optimizer state keys": (_optimizer_state_incomplete, "lacks ['exp_avg_sq']"),
    "optimizer groups": (_optimizer_groups_missing, "'optimizer' has no 'param_groups'"),
    "no step": (_no_step, "'state' has no 'step'"),
    "bad best_state": (_bad_best_state, "'best_state' is not a dict of named tensors"),
    "bad losses": (_bad_losses, "'state.losses' is not a list of numbers"),
    "not a checkpoint": (_not_a_dict, "no 'model', 'optimizer', 'state', 'rng' entry"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_refused_naming_the_file(case, good_checkpoint, tmp_path):
    tamper, words = MALFORMED[case]
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    payload = torch.load(good_checkpoint, weights_only=False)
    tamper(payload)
    torch.save(payload, ckpt / "last.pt")
    rng = torch.get_rng_state(), random.getstate()
    model = plain_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError) as info:
        surgery.apply(model, training_spec(ckpt))
    text = str(info.value)
    assert str(ckpt / "last.pt") in text and words in text, text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.set_rng_state(rng[0])
    random.setstate(rng[1])


def test_good_checkpoint_still_resumes(good_checkpoint, tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    shutil.copy(good_checkpoint, ckpt / "last.pt")
    result = surgery.train(
        surgery.apply(plain_mlp(), {"rules": training_spec(ckpt)["rules"]}),
        training_spec(ckpt)["training"],
        plain_mlp(),
    )
    assert result.resumed_from == 2


def test_checkpoint_that_is_a_fifo_is_refused(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    os.mkfifo(ckpt / "last.pt")
    try:
        exc = quickly(lambda: surgery.apply(plain_mlp(), training_spec(ckpt)))
        assert isinstance(exc, UserInputError), exc
        assert f"checkpoint {ckpt / 'last.pt'} is not a regular file" in str(exc)
    finally:
        try:
            os.close(os.open(ckpt / "last.pt", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_malformed_checkpoint_through_the_cli_exits_2(good_checkpoint, tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    payload = torch.load(good_checkpoint, weights_only=False)
    del payload["optimizer"]
    torch.save(payload, ckpt / "last.pt")
    model = tmp_path / "model.pt"
    torch.save(plain_mlp(), model)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(training_spec(ckpt)))
    result = invoke("apply", spec, model, "--no-sample-input", "-o", tmp_path / "out.pt")
    refused(result, "last.pt", "no 'optimizer' entry")
