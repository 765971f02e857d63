"""``tnsurgery export``: a model surgered with a ``qat`` rule, written with integer weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn

import tnsurgery
from tnsurgery.cli import cli
from tnsurgery.layers.qat import QATLayer, QuantizedLayer

try:
    from tests.e2e.test_cli import script
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.e2e.test_cli import script

SPEC = {
    "rules": [
        {"match": "0", "transform": "factorize", "params": {"rank": 16}},
        {
            "match": "*",
            "types": ["Linear", "LowRankLinear"],
            "transform": "qat",
            "params": {"bits": 4},
        },
    ]
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_apply_then_export_shrinks_the_files_and_reloads(tmp_path):
    torch.save(_model(), tmp_path / "model.pt")
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    r = invoke("apply", tmp_path / "spec.json", tmp_path / "model.pt", "--sample-input", "4x128")
    assert r.exit_code == 0, r.output
    surgered = tmp_path / "model.surgered.pt"
    assert "tensors stored" in r.output  # the plan reports bytes before/after
    r = invoke("export", surgered, "--sample-input", "4x128", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [x["name"] for x in report["layers"]] == ["0", "2"]
    assert report["model_bytes_after"] < report["model_bytes_before"] / 4
    assert report["output_error"] < 1e-6
    out = tmp_path / "model.exported.pt"
    weights = tmp_path / "model.exported.safetensors"
    assert set(report["written"]) == {
        str(out),
        str(tmp_path / "model.exported.manifest.json"),
        str(weights),
    }
    surgered_weights = tmp_path / "model.surgered.safetensors"
    assert weights.stat().st_size < 0.5 * surgered_weights.stat().st_size
    # the manifest pair loads back on a fresh base model, and so does the pickle
    x = torch.randn(3, 128)
    pair = tnsurgery.load(weights, _model()).eval()
    assert isinstance(pair[0], QuantizedLayer) and isinstance(pair[2], QuantizedLayer)
    pickled = torch.load(out, weights_only=False).eval()
    fq = torch.load(surgered, weights_only=False).eval()
    assert isinstance(fq[0], QATLayer)
    with torch.no_grad():
        assert torch.equal(pair(x), pickled(x))
        assert torch.allclose(pair(x), fq(x), atol=1e-6)
    # the table form
    r = invoke("export", surgered, "-o", tmp_path / "again.pt")
    assert r.exit_code == 0 and "model tensors:" in r.stdout and "wrote" in r.stdout


def test_export_of_a_model_without_qat_exits_2_and_writes_nothing(tmp_path):
    torch.save(_model(), tmp_path / "model.pt")
    before = set(tmp_path.iterdir())
    r = script("export", tmp_path / "model.pt")
    assert r.returncode == 2
    assert "no QAT layer" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert set(tmp_path.iterdir()) == before
