"""``tnsurgery inspect`` on a surgered model: each surgered layer is one row (its
parts inside it), with the dense weight it computes with, its own parameter count
and the rank of that weight; a pickled output with TT layers reloads by default."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch import nn

import tnsurgery
from tnsurgery.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_lists_surgered_layers_as_one_row_each(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8), nn.Conv2d(3, 8, 3), nn.Linear(8, 8)
    )
    torch.save(model, tmp_path / "m.pt")
    spec = {
        "version": 1,
        "rules": [
            {"match": "0", "transform": "factorize", "params": {"rank": 4}},
            {"match": "2", "transform": "tt", "params": {"param_ratio": 0.5}},
            {"match": "3", "transform": "factorize", "params": {"rank": 2}},
            {"match": "4", "transform": "qat", "params": {"bits": 8}},
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    applied = _run(
        "apply", tmp_path / "spec.json", tmp_path / "m.pt", "-o", tmp_path / "s.pt",
        "--no-sample-input",
    )  # fmt: skip
    assert applied.exit_code == 0, applied.output

    result = _run("inspect", tmp_path / "s.pt", "--json")  # no --trust-pickle needed
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    small = tnsurgery.io.load_model(tmp_path / "s.pt").model
    assert data["params"] == sum(p.numel() for p in small.parameters())
    rows = {r["name"]: r for r in data["modules"]}
    assert set(rows) == {"0", "2", "3", "4"}  # no row for 3.first, 3.second, 4.inner
    assert [rows[n]["type"] for n in ("0", "2", "3", "4")] == [
        "LowRankLinear", "TTLinear", "LowRankConv2d", "QATLayer",
    ]  # fmt: skip
    assert all(r["surgered"] for r in rows.values())
    assert rows["0"]["shape"] == [64, 32] and rows["0"]["params"] == 4 * (32 + 64) + 64
    assert rows["0"]["effective_rank"] == 4 and rows["0"]["full_rank"] == 32
    assert rows["3"]["shape"] == [8, 3, 3, 3] and rows["3"]["effective_rank"] <= 2
    assert rows["2"]["params"] == small[2].param_count() < 64 * 8 + 8
    assert rows["4"]["shape"] == [8, 8] and rows["4"]["params"] == 8 * 8 + 8

    table = _run("inspect", tmp_path / "s.pt")
    assert table.exit_code == 0
    assert "LowRankLinear (surgered)" in table.stdout and "4/32" in table.stdout


def test_a_pickled_transformer_encoder_loads_without_flags(tmp_path):
    """nn.TransformerEncoderLayer stores F.relu: the standard activation functions are
    trusted as references (a pickle calling one is still refused: tnsurgery.pickles)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    torch.save(nn.TransformerEncoder(layer, 2), tmp_path / "enc.pt")
    spec = {
        "version": 1,
        "rules": [{"match": "**", "types": ["Linear"], "transform": "factorize",
                   "params": {"rank": 4}}],
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    applied = _run(
        "apply", tmp_path / "spec.json", tmp_path / "enc.pt", "-o", tmp_path / "s.pt",
        "--sample-input", "2x10x32", "--json",
    )  # fmt: skip
    assert applied.exit_code == 0, applied.output
    names = {r["name"] for r in json.loads(_run("inspect", tmp_path / "s.pt", "--json").stdout)[
        "modules"] if r["surgered"]}  # fmt: skip
    # the attention projections too (split out of nn.MultiheadAttention)
    assert "layers.0.self_attn.q_proj" in names and "layers.1.linear2" in names
