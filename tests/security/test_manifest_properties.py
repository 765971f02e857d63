"""Property-based tests of loading: a saved model's manifest and its safetensors header
mutated field by field (hypothesis). Each mutated output either loads, or is refused
with ModelLoadError; never any other exception, and never a large allocation.

Example counts (the CI default): 600 manifest mutations (a field of the manifest, of
a replacement, or of a layer config replaced by an arbitrary JSON value, or
removed), 300 safetensors header mutations (a tensor's dtype, shape or offsets, the
metadata, or the header length), 200 through the CLI's ``inspect``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnsurgery
from tests.security.helpers import plain_mlp
from tnsurgery.errors import ModelLoadError

SPEC = {
    "rules": [
        {"match": "0", "transform": "factorize", "params": {"rank": 4}},
        {"match": "2", "transform": "tt", "params": {"rank": 2}},
    ]
}


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
        database=None,
    )


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**12]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["../x", "/etc/passwd", "os.system", "tnsurgery.manifest", ""]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    small = tnsurgery.surgery.apply(plain_mlp(), SPEC)
    return tnsurgery.save(small, tmp_path_factory.mktemp("saved") / "out")


def _paths(raw: dict) -> list[tuple]:
    """Places to mutate: top-level fields, replacement fields, config fields."""
    found: list[tuple] = [(k,) for k in raw]
    for i, rep in enumerate(raw.get("replacements", [])):
        found += [("replacements", i, k) for k in rep]
        found += [("replacements", i, "config", k) for k in rep.get("config", {})]
    return found


def _set(raw: dict, path: tuple, value, delete: bool) -> None:
    target = raw
    for key in path[:-1]:
        target = target[key]
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


def _load(directory: Path) -> None:
    try:
        tnsurgery.load(directory, plain_mlp())
    except ModelLoadError:
        pass


@examples(600)
@given(data=st.data())
def test_manifest_mutations_load_or_are_refused(saved, tmp_path_factory, data):
    raw = json.loads((saved / "manifest.json").read_text())
    path = data.draw(st.sampled_from(_paths(raw)))
    value = data.draw(json_values)
    delete = data.draw(st.booleans())
    _set(raw, path, value, delete)
    work = tmp_path_factory.mktemp("m")
    shutil.copy(saved / "model.safetensors", work / "model.safetensors")
    (work / "manifest.json").write_text(json.dumps(raw))
    _load(work)


def _read_st(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _write_st(path: Path, header: dict, data: bytes, length_delta: int = 0) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", max(0, len(text) + length_delta)) + text + data)


@examples(300)
@given(data=st.data())
def test_safetensors_header_mutations_load_or_are_refused(saved, tmp_path_factory, data):
    header, body = _read_st(saved / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "meta", "length", "drop"]))
    delta = 0
    if what == "dtype":
        header[name]["dtype"] = data.draw(
            st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "BOOL", "X", ""])
        )
    elif what == "shape":
        header[name]["shape"] = data.draw(
            st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4)
        )
    elif what == "data_offsets":
        header[name]["data_offsets"] = data.draw(
            st.lists(st.integers(min_value=-1, max_value=2**40), min_size=0, max_size=3)
        )
    elif what == "meta":
        header["__metadata__"] = data.draw(
            st.dictionaries(
                st.sampled_from(["tnsurgery_manifest", "format"]), st.text(), max_size=2
            )
        )
    elif what == "length":
        delta = data.draw(st.integers(min_value=-50, max_value=50))
    else:
        header.pop(name)
    work = tmp_path_factory.mktemp("h")
    shutil.copy(saved / "manifest.json", work / "manifest.json")
    _write_st(work / "model.safetensors", header, body, delta)
    _load(work)


@examples(200)
@given(data=st.data())
def test_the_cli_answers_exit_0_or_2_for_mutated_outputs(saved, tmp_path_factory, data):
    from click.testing import CliRunner

    from tests.security.helpers import ROOT
    from tnsurgery.cli import cli

    raw = json.loads((saved / "manifest.json").read_text())
    path = data.draw(st.sampled_from(_paths(raw)))
    _set(raw, path, data.draw(json_values), data.draw(st.booleans()))
    work = tmp_path_factory.mktemp("c")
    shutil.copy(saved / "model.safetensors", work / "model.safetensors")
    (work / "manifest.json").write_text(json.dumps(raw))
    import os

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        r = CliRunner().invoke(
            cli, ["inspect", str(work), "--arch", "tests.security.helpers:plain_mlp"]
        )
    finally:
        os.chdir(here)
    assert r.exit_code in (0, 2), r.output
    assert "Internal error" not in r.output and "Traceback" not in r.output
