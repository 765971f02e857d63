"""Global budgets: validation, the budget is met, and sensitivity beats a uniform ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.errors import SpecError
from tnsurgery.spec import load_spec
from tnsurgery.surgery import output_error

RULE = {"match": "**", "types": ["Linear"], "transform": "factorize", "params": {}}


def trained_like(out_f: int, in_f: int, decay: float, g: torch.Generator) -> torch.Tensor:
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)
    return (u * s) @ v.T


class Lopsided(nn.Module):
    """Two layers with the same spectrum; the output sees ``a`` through a x50 gain."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            w = trained_like(64, 64, 0.5, g)
            self.a.weight.copy_(w)
            self.b.weight.copy_(w)

    def forward(self, x):
        return 50 * self.a(x) + self.b(x)


def test_budget_validation_names_the_rule_and_field():
    bad = {"rules": [{**RULE, "params": {"rank": 4}}], "budget": {"params": 0.5}}
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert "rule 0 (match '**'): field 'params.rank'" in str(info.value)
    assert "budget chooses this rule's ranks" in str(info.value)
    with pytest.raises(SpecError, match="give exactly one of params, flops"):
        load_spec({"rules": [RULE], "budget": {"params": 0.5, "flops": 0.5}})
    with pytest.raises(SpecError, match="field 'budget.rules': no rule 3"):
        load_spec({"rules": [RULE], "budget": {"params": 0.5, "rules": [3]}})
    # rules outside the budget keep needing their rank option
    with pytest.raises(SpecError, match="give exactly one of"):
        load_spec({"rules": [RULE, RULE], "budget": {"params": 0.5, "rules": [0]}})
    spec = load_spec({"rules": [RULE], "budget": {"params": 0.5}})
    assert spec.budget.params == 0.5


def test_budget_is_met_in_total():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32)
    )
    x = torch.randn(16, 96)
    small = surgery.apply(model, {"rules": [RULE], "budget": {"params": 0.4}}, x)
    report = tnsurgery.get_manifest(small)["budget"]
    assert report["cost_after"] <= 0.4 * report["cost_before"] + 1e-9
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert after <= 0.4 * before + 1e-9
    assert len(report["layers"]) == 3


def test_sensitivity_beats_a_uniform_ratio():
    model = Lopsided().eval()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    uniform = surgery.apply(model, {"rules": [{**RULE, "params": {"param_ratio": 0.5}}]}, x)
    budget = surgery.apply(model, {"rules": [RULE], "budget": {"params": 0.5}}, x)
    err_uniform, _ = output_error(ref, uniform(x))
    err_budget, _ = output_error(ref, budget(x))
    assert err_budget < 0.8 * err_uniform  # 0.41 vs 0.55 here
    layers = {x["name"]: x for x in tnsurgery.get_manifest(budget)["budget"]["layers"]}
    assert layers["a"]["param_ratio"] > layers["b"]["param_ratio"]  # the sensitive one keeps more
    assert layers["a"]["sensitivity"] > 100 * layers["b"]["sensitivity"]


def test_flops_budget_and_plan_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(8, 64)
    p = surgery.plan(model, {"rules": [RULE], "budget": {"flops": 0.5}}, x)
    assert p.budget["kind"] == "flops"
    assert p.budget["cost_after"] <= 0.5 * p.budget["cost_before"]
    replaced = [t for t in p.targets if t.status == "replace"]
    assert sum(t.flops_after for t in replaced) <= 0.5 * sum(t.flops_before for t in p.targets)


def test_budget_without_sample_input_still_meets_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    p = surgery.plan(model, {"rules": [RULE], "budget": {"params": 0.3}})
    assert p.budget["sensitivity"] == "none"
    assert p.budget["cost_after"] <= 0.3 * p.budget["cost_before"]


def test_a_layer_the_budget_keeps_dense_says_so():
    model = Lopsided().eval()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    p = surgery.plan(model, {"rules": [RULE], "budget": {"params": 0.9}}, x)
    dense = [t for t in p.targets if t.status == "skip"]
    assert dense and all(t.reason == "kept dense by the spec's budget" for t in dense)
