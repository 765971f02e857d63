"""The ``tnsurgery`` command line: commands, outputs, exit codes (0 ok, 2 bad input, 1 bug).

Most tests call the click group in-process (CliRunner); a few run the
installed console script in a subprocess to check real exit codes and that
bad input never prints a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

import tnsurgery
from tnsurgery import io
from tnsurgery.cli import cli
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers import LowRankLinear
from tnsurgery.plugins import get_plugin_manager
from tnsurgery.transform import Decision, Transform

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import models

ROOT = Path(__file__).resolve().parents[2]
MLP_SPEC = {
    "version": 1,
    "rules": [{"match": "fc*", "transform": "factorize", "params": {"rank": 4}}],
}
SEQ_SPEC = {
    "version": 1,
    "rules": [{"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 4}}],
}
TNSURGERY = shutil.which("tnsurgery")


def invoke(*args: str):
    """Run the CLI in-process; stdout and stderr are kept apart."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def script(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run the installed console script."""
    assert TNSURGERY, "the tnsurgery console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TNSURGERY_DEBUG": ""}
    return subprocess.run(
        [TNSURGERY, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def spec_file(tmp_path) -> Path:
    return write_json(tmp_path / "spec.json", SEQ_SPEC)


@pytest.fixture
def plain_pt(tmp_path) -> Path:
    """A pickled nn.Sequential (torch.nn classes only: loads without flags)."""
    torch.save(models.plain_mlp(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


@pytest.fixture
def custom_pt(tmp_path) -> Path:
    """A pickled tests.models.MLP: a class that is not trusted by default."""
    torch.save(models.mlp(), tmp_path / "custom.pt")
    return tmp_path / "custom.pt"


# ------------------------------------------------------------ spec commands


def test_validate_a_good_spec(spec_file):
    result = invoke("validate", spec_file)
    assert result.exit_code == 0
    assert result.stdout.strip() == f"{spec_file}: valid (1 rule)"


def test_validate_a_bad_spec_names_the_rule_and_the_field(tmp_path):
    bad = write_json(
        tmp_path / "bad.json",
        {
            "version": 1,
            "rules": [
                {"match": "fc1", "transform": "factorize", "params": {"rnak": 4}},
                {"match": "re:.*\\.[qkv]_proj", "transform": "factorize", "params": {"rank": 0}},
            ],
        },
    )
    result = invoke("validate", bad)
    assert result.exit_code == 2
    assert result.stdout == ""
    err = result.stderr
    assert err.startswith(f"Error: invalid spec in {bad}: 2 problems")
    assert (
        "rule 0 (match 'fc1'): unknown field 'params.rnak' for transform 'factorize'; "
        "did you mean 'rank'?"
    ) in err
    # the pattern is shown as written (no markup eaten), with the field
    assert "[qkv]_proj" in err
    assert "field 'params.rank': Input should be greater than 0" in err
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "spec file not found"),
        ("{not json", "not valid JSON"),
        ('{"version": 1, "rules": []}', "rules"),
    ],
)
def test_validate_unreadable_specs_exit_2(content, message, tmp_path):
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    result = invoke("validate", path)
    assert result.exit_code == 2
    assert message in result.stderr


def test_schema_is_a_valid_json_schema_that_checks_specs():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "factorize" in schema["$defs"]["Rule"]["properties"]["transform"]["enum"]
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(MLP_SPEC)) == []
    bad = {
        "version": 1,
        "rules": [{"match": "x", "transform": "factorize", "params": {"rank": 4, "rnak": 1}}],
    }
    assert list(validator.iter_errors(bad))


def test_plugins_lists_factorize_as_builtin():
    result = invoke("plugins")
    assert result.exit_code == 0
    line = next(ln for ln in result.stdout.splitlines() if "factorize" in ln)
    assert "builtin" in line and "Linear, Conv2d, Conv1D" in line
    data = json.loads(invoke("plugins", "--json").stdout)
    factorize = next(t for t in data["transforms"] if t["name"] == "factorize")
    assert factorize["origin"] == "builtin"
    assert factorize["types"] == ["Linear", "Conv2d", "Conv1D"]
    assert {"rank", "rank_ratio", "param_ratio", "energy", "max_error"} <= set(factorize["params"])
    assert isinstance(data["failed"], list)


# ------------------------------------------------------------------ inspect


def test_inspect_finds_the_rank_of_a_known_rank_weight(tmp_path):
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 5, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 5, generator=gen, dtype=torch.float64))
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # 1/55 of energy in the last
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.copy_((u * s) @ v.T)
    assert np.linalg.matrix_rank(model[0].weight.detach().numpy(), tol=1e-4) == 5
    torch.save(model, tmp_path / "m.pt")

    result = invoke("inspect", tmp_path / "m.pt", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["kind"] == "pickle" and data["params"] == sum(p.numel() for p in model.parameters())
    rows = {r["name"]: r for r in data["modules"]}
    assert rows["0"]["effective_rank"] == 5 and rows["0"]["full_rank"] == 48
    assert rows["0"]["shape"] == [64, 48] and rows["0"]["params"] == 64 * 48 + 64
    assert rows["2"]["full_rank"] == 10
    # at 95% energy the smallest direction (1/55 < 5%) is not needed
    lower = json.loads(invoke("inspect", tmp_path / "m.pt", "--json", "--energy", "0.95").stdout)
    assert lower["modules"][0]["effective_rank"] == 4

    table = invoke("inspect", tmp_path / "m.pt")
    assert table.exit_code == 0
    assert "5/48" in table.stdout and "64x48" in table.stdout


# --------------------------------------------------------------------- plan


def test_plan_prints_a_table_and_changes_nothing(spec_file, plain_pt):
    before = files_in(plain_pt.parent)
    result = invoke("plan", spec_file, plain_pt, "--sample-input", "8x16")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "traced by torch.fx symbolic trace" in out
    assert "total: 3 replaced, 0 skipped, 0 refused" in out
    assert "rank=4" in out
    assert "model parameters:" in out
    assert files_in(plain_pt.parent) == before


def test_plan_json_has_targets_and_totals(spec_file, plain_pt):
    result = invoke("plan", spec_file, plain_pt, "--sample-input", "8x16", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    model = models.plain_mlp()
    totals = data["totals"]
    assert totals["replaced"] == 3
    assert totals["model_params_before"] == sum(p.numel() for p in model.parameters())
    assert totals["flops_before"] == sum(
        2 * 8 * m.in_features * m.out_features for m in model if isinstance(m, nn.Linear)
    )
    assert [t["name"] for t in data["targets"]] == ["0", "2", "4"]
    assert data["applied"] is False


# -------------------------------------------------------------------- apply


def test_apply_writes_the_model_and_its_pair(spec_file, plain_pt, tmp_path):
    out = tmp_path / "small.pt"
    result = invoke("apply", spec_file, plain_pt, "-o", out, "--sample-input", "8x16")
    assert result.exit_code == 0, result.stderr
    assert out.exists()
    assert (tmp_path / "small.manifest.json").exists()
    assert (tmp_path / "small.safetensors").exists()
    assert "output error on the sample input:" in result.stdout
    assert f"wrote {out}" in result.stdout
    manifest = json.loads((tmp_path / "small.manifest.json").read_text())
    assert manifest["weights"] == "small.safetensors"
    assert [r["resolved"]["rank"] for r in manifest["replacements"]] == [4, 4, 4]
    assert set(load_file(tmp_path / "small.safetensors")) == {
        f"{i}.{p}" for i in (0, 2, 4) for p in ("u", "v", "bias")
    }
    small = io.load_model(out).model
    assert isinstance(small[0], LowRankLinear)
    assert tnsurgery.get_manifest(small)["output_error"] == manifest["output_error"]


def test_apply_json_reports_the_output_error(spec_file, plain_pt, tmp_path):
    out = tmp_path / "small.pt"
    result = invoke("apply", spec_file, plain_pt, "-o", out, "--sample-input", "8x16", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert 0 < data["output_error"] < 1
    assert data["output_error_name"] == "output"
    assert data["written"] == [
        str(out),
        str(tmp_path / "small.manifest.json"),
        str(tmp_path / "small.safetensors"),
    ]
    assert data["plan"]["applied"] is True
    # reproduce the reported error from the written model, on the same sample input
    x = torch.randn((8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = models.plain_mlp()(x), io.load_model(out).model(x)
    expected = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert data["output_error"] == pytest.approx(expected, rel=1e-9)


def test_apply_without_output_writes_beside_the_input(spec_file, plain_pt):
    result = invoke("apply", spec_file, plain_pt)
    assert result.exit_code == 0
    assert files_in(plain_pt.parent) >= {
        "model.pt",
        "model.surgered.pt",
        "model.surgered.manifest.json",
        "model.surgered.safetensors",
    }
    assert "output error: not measured" in result.stdout


def test_apply_with_arch_and_a_state_dict(tmp_path, in_repo_root):
    save_file(models.mlp().state_dict(), str(tmp_path / "w.safetensors"))
    spec = write_json(tmp_path / "spec.json", MLP_SPEC)
    out = tmp_path / "small.safetensors"
    result = invoke(
        "apply",
        spec,
        tmp_path / "w.safetensors",
        "--arch",
        "tests.models:mlp",
        "-o",
        out,
        "--sample-input",
        "4x16",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert files_in(tmp_path) == {
        "spec.json",
        "w.safetensors",
        "small.safetensors",
        "small.manifest.json",
    }
    again = io.load_model(out, arch="tests.models:mlp").model
    assert isinstance(again.fc3, LowRankLinear)


@pytest.mark.parametrize("case", ["bad spec", "missing model", "truncated model", "no match"])
def test_apply_bad_input_exits_2_and_writes_nothing(case, spec_file, plain_pt, tmp_path):
    spec, model = spec_file, plain_pt
    if case == "bad spec":
        spec = write_json(tmp_path / "bad.json", {"version": 1, "rules": [{"match": "*"}]})
    elif case == "missing model":
        model = tmp_path / "nothing.pt"
    elif case == "truncated model":
        data = plain_pt.read_bytes()
        plain_pt.write_bytes(data[: len(data) // 2])
    else:
        spec = write_json(
            tmp_path / "bad.json",
            {
                "version": 1,
                "rules": [{"match": "head", "transform": "factorize", "params": {"rank": 2}}],
            },
        )
    before = files_in(tmp_path)
    out = tmp_path / "out.pt"
    result = invoke("apply", spec, model, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.lstrip().startswith("Error: ")
    assert "Traceback" not in result.output
    assert files_in(tmp_path) == before


def test_apply_refuses_to_overwrite_its_input(spec_file, plain_pt):
    original = plain_pt.read_bytes()
    result = invoke("apply", spec_file, plain_pt, "-o", plain_pt)
    assert result.exit_code == 2
    assert "overwrite the input" in result.stderr
    assert plain_pt.read_bytes() == original


def test_bad_sample_input_exits_2(spec_file, plain_pt):
    result = invoke("plan", spec_file, plain_pt, "--sample-input", "banana")
    assert result.exit_code == 2
    assert "--sample-input" in result.stderr


# ------------------------------------------------------- pickle trust flags


@pytest.mark.parametrize("command", ["apply", "plan", "inspect"])
def test_untrusted_pickle_is_refused_then_allowed_by_the_flags(command, custom_pt, tmp_path):
    spec = write_json(tmp_path / "spec.json", MLP_SPEC)
    args = [command] + ([spec] if command != "inspect" else []) + [custom_pt]
    if command == "apply":
        args += ["-o", tmp_path / "out.pt"]
    refused = invoke(*args)
    assert refused.exit_code == 2
    assert "tests.models.MLP" in refused.stderr
    assert "--trust-pickle" in refused.stderr and "--allow-class" in refused.stderr
    assert not (tmp_path / "out.pt").exists()
    for flags in (["--trust-pickle"], ["--allow-class", "tests.models.MLP"]):
        result = invoke(*args, *flags)
        assert result.exit_code == 0, (flags, result.stderr)
    if command == "apply":
        assert (tmp_path / "out.pt").exists()


# ---------------------------------------------------------- internal errors


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _boom_build(module, params, ctx):
    raise RuntimeError("boom: a bug in a transform")


class Boom:
    """A plugin whose transform's build raises: a bug, not bad input."""

    @hookimpl
    def register_transforms(self, register):
        register(
            Transform(
                name="boom",
                params_model=_NoParams,
                module_types=(nn.Linear,),
                build=_boom_build,
                plan=lambda module, params, ctx: Decision(resolved={}, params_after=1),
                layers=(LowRankLinear,),
            )
        )


@pytest.fixture
def boom_plugin():
    pm = get_plugin_manager()
    plugin = Boom()
    pm.register(plugin)
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def test_an_internal_error_exits_1_without_traceback(boom_plugin, plain_pt, tmp_path):
    spec = write_json(
        tmp_path / "boom.json", {"version": 1, "rules": [{"match": "0", "transform": "boom"}]}
    )
    before = files_in(tmp_path)
    result = invoke("apply", spec, plain_pt, "-o", tmp_path / "out.pt")
    assert result.exit_code == 1
    assert result.stderr.lstrip().startswith("Internal error: SurgeryError: ")
    assert "boom: a bug in a transform" in result.stderr
    assert "TNSURGERY_DEBUG=1" in result.stderr
    assert "Traceback" not in result.output
    assert files_in(tmp_path) == before


# --------------------------------------------------------------------- demo


def test_demo_prints_error_size_and_speed():
    result = invoke("demo")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "measured output error:" in out
    assert "size:" in out and "MB ->" in out
    assert "speed (median forward" in out
    assert "total: 3 replaced" in out


def test_demo_json():
    data = json.loads(invoke("demo", "--json").stdout)
    assert 0 < data["output_error"] < 1
    assert data["bytes_after"] < data["bytes_before"]
    assert data["latency_ms_before"] > 0 and data["latency_ms_after"] > 0


# --------------------------------------------------- the real console script


def test_script_exit_codes_and_no_traceback(tmp_path, spec_file, plain_pt):
    ok = script("validate", spec_file)
    assert ok.returncode == 0 and "valid" in ok.stdout

    bad = write_json(tmp_path / "bad.json", {"version": 1, "rules": [{"match": 3}]})
    res = script("validate", bad)
    assert res.returncode == 2
    assert "rule 0" in res.stderr and "Traceback" not in res.stderr

    data = plain_pt.read_bytes()
    plain_pt.write_bytes(data[: len(data) // 3])
    before = files_in(tmp_path)
    res = script("apply", spec_file, plain_pt, "-o", tmp_path / "out.pt")
    assert res.returncode == 2
    assert "truncated" in res.stderr and "Traceback" not in res.stderr
    assert files_in(tmp_path) == before


def test_script_apply_with_arch_from_the_working_directory(tmp_path):
    torch.save(models.mlp().state_dict(), tmp_path / "sd.pt")
    spec = write_json(tmp_path / "spec.json", MLP_SPEC)
    res = script(
        "apply",
        spec,
        tmp_path / "sd.pt",
        "--arch",
        "tests.models:mlp",
        "-o",
        tmp_path / "out.pt",
        "--sample-input",
        "4x16",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads(res.stdout)["output_error"] > 0
    assert files_in(tmp_path) >= {"out.pt", "out.manifest.json", "out.safetensors"}


def test_script_unpickles_trusted_classes_from_the_working_directory(custom_pt):
    """--trust-pickle / --allow-class find the model's classes where --arch finds its factory."""
    for flags in (["--trust-pickle"], ["--allow-class", "tests.models.MLP"]):
        res = script("inspect", custom_pt, "--json", *flags)
        assert res.returncode == 0, (flags, res.stderr)
        assert json.loads(res.stdout)["model"] == "MLP"
