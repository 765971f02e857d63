"""Tests of the ``prune`` example plugin: the numbers against the dense layer, and the
plugin used the way users use it (entry point, spec, save/load, CLI).

Skipped when the plugin is not installed (``pip install ./plugins/tnsurgery-prune``).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.cli import cli
from tnsurgery.errors import SpecError
from tnsurgery.plugins import get_registry
from tnsurgery.spec import load_spec
from tnsurgery.transform import Context

tnsurgery_prune = pytest.importorskip("tnsurgery_prune")
from tnsurgery_prune import PruneParams, prune_mask  # noqa: E402
from tnsurgery_prune.layers import PrunedConv2d, PrunedLinear  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "specs" / "prune_mlp.json"


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def pruned(module: nn.Module, sparsity: float, scope: str = "layer", input_shape=None):
    """Plan and build ``prune`` on one module, as the pipeline does."""
    params = PruneParams(sparsity=sparsity, scope=scope)
    decision = tnsurgery_prune.plan(module, params, Context("m", input_shape))
    layer = tnsurgery_prune.build(module, params, Context("m", input_shape, decision))
    return decision, layer


# ------------------------------------------------------------------ the numbers


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("shape", [(64, 32), (7, 13), (8, 3, 3, 3)])
def test_layer_scope_zeroes_exactly_the_smallest(sparsity, shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    mask = prune_mask(w, sparsity, "layer")
    n = w.numel()
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(sparsity * n)
    # independent reference: the pruned set is the round(s*n) smallest magnitudes
    smallest = set(torch.argsort(w.abs().flatten())[: round(sparsity * n)].tolist())
    assert set(torch.nonzero(~mask.flatten()).flatten().tolist()) == smallest


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_row_scope_prunes_each_row(sparsity):
    torch.manual_seed(2)
    w = torch.randn(10, 4, 3, 3)
    mask = prune_mask(w, sparsity, "row").reshape(10, -1)
    rows = w.reshape(10, -1).abs()
    k = round(sparsity * 36)
    for r in range(10):
        assert int((~mask[r]).sum()) == k
        assert rows[r][~mask[r]].max() <= rows[r][mask[r]].min()


def test_ties_are_broken_by_position():
    w = torch.ones(2, 3)
    mask = prune_mask(w, 0.5, "layer")
    assert mask.tolist() == [[False, False, False], [True, True, True]]


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense_layer_with_masked_weight(scope, bias):
    torch.manual_seed(3)
    lin = nn.Linear(32, 24, bias=bias)
    decision, layer = pruned(lin, 0.6, scope, input_shape=(5, 32))
    mask = prune_mask(lin.weight, 0.6, scope)
    assert torch.equal(layer.mask, mask)
    x = torch.randn(5, 32)
    expected = F.linear(x, lin.weight * mask, lin.bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.to_dense(), lin.weight * mask)

    # predicted error equals the measured one (computed here in float64)
    w = lin.weight.detach().double()
    measured = float((layer.to_dense().detach().double() - w).norm() / w.norm())
    assert decision.predicted_error == pytest.approx(measured, rel=1e-12)
    assert decision.predicted_error == pytest.approx(float(w[~mask].norm() / w.norm()), rel=1e-12)

    # sizes: only kept weights (and the bias) count
    kept = int(mask.sum())
    assert kept == 32 * 24 - decision.resolved["pruned"]
    assert layer.param_count() == kept + (24 if bias else 0) == decision.params_after
    assert layer.flops((5, 32)) == 2 * 5 * kept == decision.flops_after
    assert f"sparsity={1 - kept / 768:.3f} (kept {kept}/768 weights)" in repr(layer)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_matches_dense_conv_with_masked_weight(groups):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups)
    decision, layer = pruned(conv, 0.5, input_shape=(2, 4, 9, 9))
    assert isinstance(layer, PrunedConv2d)
    mask = prune_mask(conv.weight, 0.5)
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(x, conv.weight * mask, conv.bias, 2, 1, 1, groups)
    assert torch.equal(layer(x), expected)
    kept = int(mask.sum())
    assert layer.flops((2, 4, 9, 9)) == 2 * 2 * 5 * 5 * kept == decision.flops_after
    assert layer.param_count() == kept + 6 == decision.params_after
    w = conv.weight.detach().double()
    assert decision.predicted_error == pytest.approx(
        float((layer.to_dense().detach().double() - w).norm() / w.norm()), rel=1e-12
    )


def test_conv_with_unsupported_padding_mode_is_skipped():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    decision = tnsurgery_prune.plan(conv, PruneParams(sparsity=0.5), Context("c"))
    assert decision.skip_reason == "padding_mode='reflect' is not supported"


def test_pruned_weights_stay_zero_after_an_optimizer_step():
    torch.manual_seed(5)
    _, layer = pruned(nn.Linear(16, 8), 0.5)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = layer.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 16)).square().sum().backward()
        assert torch.count_nonzero(layer.weight.grad[~layer.mask]) == 0
        opt.step()
    assert torch.count_nonzero(layer.to_dense()[~layer.mask]) == 0
    assert not torch.equal(layer.weight[layer.mask], before[layer.mask])  # it did train


def test_config_rebuilds_the_layer():
    torch.manual_seed(6)
    for module, x in [
        (nn.Linear(12, 5), torch.randn(3, 12)),
        (nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False), torch.randn(1, 4, 6, 6)),
    ]:
        _, layer = pruned(module, 0.3)
        config = json.loads(json.dumps(layer.config()))  # JSON-compatible
        fresh = type(layer).from_config(config)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh(x), layer(x))
        assert torch.equal(fresh.mask, layer.mask)


def test_sparsity_that_prunes_nothing_is_skipped():
    decision = tnsurgery_prune.plan(nn.Linear(4, 4), PruneParams(sparsity=0.01), Context("m"))
    assert decision.skip_reason == "sparsity 0.01 prunes no weight of this layer (scope 'layer')"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sparsity": 1.0}, "field 'params.sparsity': Input should be less than 1"),
        ({"sparsity": 0}, "field 'params.sparsity': Input should be greater than 0"),
        ({}, "field 'params.sparsity': Field required"),
        ({"sparsity": 0.5, "scope": "col"}, "field 'params.scope': Input should be 'layer' or"),
        (
            {"sparsty": 0.5},
            "unknown field 'params.sparsty' for transform 'prune'; did you mean 'sparsity'?",
        ),
    ],
)
def test_bad_params_are_spec_errors(params, message):
    with pytest.raises(SpecError) as info:
        load_spec({"rules": [{"match": "0", "transform": "prune", "params": params}]})
    assert message in str(info.value)


# ------------------------------------------------------------ used as a plugin


def test_discovered_through_its_entry_point():
    eps = importlib.metadata.entry_points(group="tnsurgery", name="prune")
    assert [ep.value for ep in eps] == ["tnsurgery_prune"]
    reg = get_registry()
    assert reg.origins["prune"] == "tnsurgery-prune"
    assert reg.get("prune").build is tnsurgery_prune.build
    assert reg.layer_classes()["tnsurgery_prune.layers.PrunedLinear"] is PrunedLinear


def test_spec_file_through_surgery_apply():
    model = make_mlp()
    x = torch.randn(4, 32)
    small = surgery.apply(model, SPEC, x)
    assert isinstance(small[0], PrunedLinear)
    assert type(small[2]).__name__ == "LowRankLinear"
    assert isinstance(model[0], nn.Linear)  # the input was copied
    manifest = surgery.get_manifest(small)
    rep = {r["name"]: r for r in manifest["replacements"]}
    assert rep["0"]["transform"] == "prune"
    assert rep["0"]["layer"] == "tnsurgery_prune.layers.PrunedLinear"
    assert rep["0"]["resolved"] == {"sparsity": 0.5, "scope": "layer", "pruned": 1024}
    assert rep["0"]["params_after"] == 1024 + 64
    assert rep["0"]["weight_error"] == pytest.approx(rep["0"]["predicted_error"], rel=1e-12)
    assert rep["2"]["resolved"]["rank"] == 4
    # the surgered model computes what the masked dense layer + low-rank layer compute
    with torch.no_grad():
        hidden = F.relu(F.linear(x, model[0].weight * small[0].mask, model[0].bias))
        assert torch.allclose(small(x), small[2](hidden))
    assert math.isfinite(manifest["output_error"]) and manifest["output_error"] > 0


def test_dtype_is_kept_and_mask_stays_boolean():
    model = make_mlp().double()
    small = surgery.apply(
        model, {"rules": [{"match": "0", "transform": "prune", "params": {"sparsity": 0.5}}]}
    )
    assert small[0].weight.dtype == torch.float64
    assert small[0].mask.dtype == torch.bool


def test_save_and_load_give_identical_outputs(tmp_path):
    small = surgery.apply(make_mlp(), SPEC, torch.randn(4, 32))
    path = tnsurgery.save(small, tmp_path / "out")
    loaded = tnsurgery.load(path, nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    assert isinstance(loaded[0], PrunedLinear)
    assert torch.equal(loaded[0].mask, small[0].mask)
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def _apply_cli(tmp_path: Path):
    torch.save(make_mlp(), tmp_path / "mlp.pt")
    out = tmp_path / "mlp.small.pt"
    args = ["apply", str(SPEC), str(tmp_path / "mlp.pt"), "-o", str(out), "--sample-input", "4x32"]
    return CliRunner().invoke(cli, args), out


def test_cli_apply_with_the_spec_file(tmp_path):
    result, out = _apply_cli(tmp_path)
    assert result.exit_code == 0, result.output
    assert out.exists()
    manifest = json.loads((tmp_path / "mlp.small.manifest.json").read_text())
    assert manifest["weights"] == "mlp.small.safetensors"
    assert (tmp_path / "mlp.small.safetensors").exists()
    assert [r["transform"] for r in manifest["replacements"]] == ["prune", "factorize"]
    assert "prune" in result.output and "output error on the sample input" in result.output
    loaded = tnsurgery.load(out, nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    assert isinstance(loaded[0], PrunedLinear)


def test_pickled_output_reads_back_without_trust_flags(tmp_path):
    """The layers of an installed plugin are trusted like tnsurgery's own: the pickled
    output of ``apply`` can be inspected (or surgered again) with no flag."""
    result, out = _apply_cli(tmp_path)
    assert result.exit_code == 0, result.output
    inspected = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["manifest"] is True
