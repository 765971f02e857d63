"""surgery: plan() and apply(), the pipeline from spec to manifest."""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import tnsurgery
from tnsurgery import surgery, tracing
from tnsurgery.errors import MatchError, SurgeryError
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers import LowRankConv2d, LowRankLinear, SurgeryLayer
from tnsurgery.plugins import Registry, get_plugin_manager, get_registry
from tnsurgery.spec import load_spec
from tnsurgery.transform import Decision, Transform

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models


def rule(match, transform="factorize", **kw):
    """A rule dict; ``params`` default to ``{"rank": 4}`` for factorize."""
    params = kw.pop("params", {"rank": 4} if transform == "factorize" else {})
    return {"match": match, "transform": transform, "params": params, **kw}


def spec_of(*rules):
    return {"version": 1, "rules": list(rules)}


MLP_SPEC = spec_of(rule(["fc1", "fc2", "fc3"]))


def snapshot(model: nn.Module) -> dict:
    """Everything about a model a surgery could change: module objects, types, weights, modes."""
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "manifest": surgery.get_manifest(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == before["modules"]
    assert now["params"] == before["params"]
    assert now["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["training"] == before["training"]
    assert now["manifest"] == before["manifest"]


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def optimal_error(weight: torch.Tensor, rank: int) -> float:
    """Eckart–Young: relative Frobenius error of the best rank-``rank`` approximation."""
    s2 = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1)).square()
    return math.sqrt(float(s2[rank:].sum() / s2.sum()))


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def registry_with(*extra: Transform) -> Registry:
    """The installed transforms plus test-only ones."""
    base = get_registry()
    reg = Registry(transforms=dict(base.transforms), origins=dict(base.origins))
    for t in extra:
        reg.transforms[t.name] = t
        reg.origins[t.name] = "tests"
    return reg


def failing_transform(fail_on: tuple[str, ...] = ()) -> Transform:
    """``boom``: plans fine; its build raises for the names in ``fail_on`` (all if empty)."""

    def plan(module, params, ctx):
        return Decision(resolved={"rank": 2}, params_after=1)

    def build(module, params, ctx):
        if not fail_on or ctx.name in fail_on:
            raise RuntimeError(f"boom on {ctx.name}")
        w = module.weight.detach()
        return LowRankLinear.from_factors(w[:, :2], torch.eye(2, w.shape[1]), module.bias)

    return Transform("boom", NoParams, (nn.Linear,), build, plan, layers=(LowRankLinear,))


class Scaled(SurgeryLayer):
    """Test layer wrapping whatever is at the target's place: ``y = scale * inner(x)``."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x):
        return self.scale * self.inner(x)

    def flops(self, input_shape):
        return self.inner.flops(input_shape)

    def config(self):
        return {"scale": self.scale}

    @classmethod
    def from_config(cls, config, current=None):
        return cls(current, **config)


class ScaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 2.0


def wrap_transform() -> Transform:
    """``wrap``: wraps a factorized layer (a later pass working on an earlier one's output)."""
    return Transform(
        "wrap",
        ScaleParams,
        (LowRankLinear,),
        lambda module, params, ctx: Scaled(copy.deepcopy(module), params.scale),
        layers=(Scaled,),
    )


@pytest.fixture
def observer():
    """A plugin object recording before_surgery / after_surgery calls."""

    class Observer:
        def __init__(self):
            self.calls = []

        @hookimpl
        def before_surgery(self, model, plan):
            self.calls.append(("before", model, type(model.fc1), len(plan.targets)))

        @hookimpl
        def after_surgery(self, model, plan, manifest):
            self.calls.append(("after", model, type(model.fc1), manifest))

    obj = Observer()
    pm = get_plugin_manager()
    pm.register(obj)
    try:
        yield obj
    finally:
        pm.unregister(obj)


# ---------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "spec",
    [
        MLP_SPEC,
        spec_of(rule("fc1"), rule("*", types=["Linear"], params={"param_ratio": 0.5})),
    ],
    ids=["one-rule", "two-rules"],
)
@pytest.mark.parametrize("with_input", [False, True])
def test_plan_does_not_touch_the_model(spec, with_input):
    model = models.mlp()
    before = snapshot(model)
    plan = surgery.plan(model, spec, torch.randn(4, 16) if with_input else None)
    assert plan.replaced()
    assert_unchanged(model, before)


def test_plan_of_an_mlp_against_independent_numbers():
    model, x = models.mlp(), torch.randn(5, 16)
    plan = surgery.plan(model, MLP_SPEC, x)
    assert not plan.applied
    assert [t.name for t in plan.targets] == ["fc1", "fc2", "fc3"]
    for tp in plan.targets:
        m = getattr(model, tp.name)
        r = 4
        assert tp.status == "replace" and tp.reason is None
        assert tp.resolved["rank"] == r
        assert tp.rule_index == 0 and tp.rule == "rule 0 (match 'fc1', 'fc2', ...)"
        assert tp.module_type == "Linear" and tp.transform == "factorize"
        assert tp.params_before == m.in_features * m.out_features + m.out_features
        assert tp.params_after == r * (m.in_features + m.out_features) + m.out_features
        assert tp.flops_before == 2 * 5 * m.in_features * m.out_features
        assert tp.flops_after == 2 * 5 * r * (m.in_features + m.out_features)
        assert tp.predicted_error == pytest.approx(optimal_error(m.weight, r), rel=1e-4)
        assert tp.input_shape == (5, m.in_features) and tp.output_shape == (5, m.out_features)
        assert tp.weight_error is None and tp.output_error is None  # nothing built
    assert [t.call_order for t in plan.targets] == [0, 1, 2]
    totals = plan.totals()
    n_params = sum(p.numel() for p in model.parameters())
    assert totals["targets"] == totals["replaced"] == 3
    assert totals["params_before"] == n_params
    assert totals["params_after"] == sum(t.params_after for t in plan.targets)
    assert totals["model_params_before"] == n_params
    assert totals["model_params_after"] == totals["params_after"]
    assert totals["flops_before"] == sum(t.flops_before for t in plan.targets)
    assert json.loads(json.dumps(plan.to_dict()))["totals"] == totals


def test_plan_accepts_a_spec_file_and_a_spec_object(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(MLP_SPEC))
    model = models.mlp()
    from_dict = surgery.plan(model, MLP_SPEC).to_dict()
    assert surgery.plan(model, path).to_dict() == from_dict
    assert surgery.plan(model, str(path)).to_dict() == from_dict
    assert surgery.plan(model, load_spec(MLP_SPEC)).to_dict() == from_dict


def test_a_layer_that_would_not_shrink_is_skipped_with_the_reason():
    model = models.mlp()
    plan = surgery.plan(model, spec_of(rule(["fc1", "fc2"], params={"rank": 12})))
    fc1, fc2 = plan.targets
    # fc1 is 48x16 (768 weights): rank 12 needs 12 * (48 + 16) = 768, no gain
    assert fc1.status == "skip" and "would not shrink" in fc1.reason
    assert fc1.resolved["rank"] == 12
    assert fc2.status == "replace"  # 48x48: 12 * 96 < 2304
    small = surgery.apply(model, spec_of(rule(["fc1", "fc2"], params={"rank": 12})))
    assert type(small.fc1) is nn.Linear and isinstance(small.fc2, LowRankLinear)
    skipped = surgery.get_manifest(small)["not_replaced"]
    assert skipped == [{"name": "fc1", "rule_index": 0, "status": "skip", "reason": fc1.reason}]


SPECS_FOR_BOTH_PATHS = {
    "mlp": (
        models.mlp,
        (6, 16),
        spec_of(rule(["fc1", "fc3"]), rule("fc2", params={"energy": 0.9})),
    ),
    "cnn": (
        models.cnn,
        (2, 3, 16, 16),
        spec_of(
            rule("conv*", types=["Conv2d"], params={"rank_ratio": 0.25}),
            rule("fc", params={"param_ratio": 0.5}),
        ),
    ),
}


@pytest.mark.parametrize("case", SPECS_FOR_BOTH_PATHS)
def test_fx_and_hook_paths_give_the_same_plan(case, monkeypatch):
    factory, shape, spec = SPECS_FOR_BOTH_PATHS[case]
    model, x = factory(), torch.randn(shape)
    plans = {}
    for method in ("fx", "hooks"):
        monkeypatch.setattr(surgery, "trace", functools.partial(tracing.trace, method=method))
        plans[method] = surgery.plan(model, spec, x)
    fx, hooks = plans["fx"], plans["hooks"]
    assert [p.trace for p in fx.passes] == ["torch.fx symbolic trace"] * 2
    assert all(p.trace.startswith("forward hooks") for p in hooks.passes)
    assert len(fx.targets) >= 3
    for a, b in zip(fx.targets, hooks.targets, strict=True):
        assert a.call_order is not None and a.flops_before and a.predicted_error is not None
        assert asdict(a) == asdict(b)
    assert fx.totals() == hooks.totals()


# --------------------------------------------------------------------- apply


def test_apply_returns_a_copy_of_the_same_class():
    model, x = models.mlp(), torch.randn(4, 16)
    before = snapshot(model)
    small = surgery.apply(model, MLP_SPEC)
    assert small is not model
    assert type(small) is models.MLP
    assert not isinstance(small, torch.fx.GraphModule)
    assert all(isinstance(getattr(small, n), LowRankLinear) for n in ("fc1", "fc2", "fc3"))
    assert_unchanged(model, before)
    with torch.no_grad():
        dense = model.fc2.weight
        assert rel_error(small.fc2.to_dense(), dense) == pytest.approx(
            optimal_error(dense, 4), rel=1e-3
        )
        assert small(x).shape == model(x).shape


def test_apply_inplace_modifies_the_given_model():
    model = models.mlp()
    fc3 = model.fc3
    small = surgery.apply(model, spec_of(rule(["fc1", "fc2"])), inplace=True)
    assert small is model
    assert isinstance(model.fc1, LowRankLinear) and isinstance(model.fc2, LowRankLinear)
    assert model.fc3 is fc3
    assert surgery.get_manifest(model) is not None


def test_apply_keeps_dtype_and_training_mode():
    model = models.mlp().double().train()
    x = torch.randn(4, 16, dtype=torch.float64)
    small = surgery.apply(model, MLP_SPEC, x)
    assert all(p.dtype == torch.float64 for p in small.parameters())
    assert all(p.device == torch.device("cpu") for p in small.parameters())
    assert small.training and small.fc2.training
    assert model.training and model.fc2.training  # verification ran in eval, then restored
    with torch.no_grad():
        assert small(x).dtype == torch.float64
    # float64 all the way: the weight error matches Eckart–Young to float64 precision
    rep = {r["name"]: r for r in surgery.get_manifest(small)["replacements"]}
    assert rep["fc1"]["weight_error"] == pytest.approx(optimal_error(model.fc1.weight, 4), 1e-9)


def test_apply_factorizes_convolutions():
    model, x = models.cnn(), torch.randn(2, 3, 16, 16)
    small = surgery.apply(model, spec_of(rule("conv*", params={"rank": 4})), x)
    assert isinstance(small.conv1, LowRankConv2d) and isinstance(small.conv2, LowRankConv2d)
    rep = {r["name"]: r for r in surgery.get_manifest(small)["replacements"]}
    for name in ("conv1", "conv2"):
        w = getattr(model, name).weight
        assert small.get_submodule(name).to_dense().shape == w.shape
        assert rep[name]["weight_error"] == pytest.approx(optimal_error(w, 4), rel=1e-3)
    with torch.no_grad():
        assert small(x).shape == (2, 10)


def test_rules_are_passes_a_later_rule_sees_the_earlier_output():
    model = models.mlp()
    spec = spec_of(
        rule("fc1"),
        rule("*", types=["Linear"], params={"param_ratio": 0.5}),
    )
    plan = surgery.plan(model, spec)
    second = [t.name for t in plan.targets if t.rule_index == 1]
    assert second == ["fc2", "fc3"]  # fc1 is a LowRankLinear by then, not a Linear
    assert plan.passes[1].wrong_type == 2  # fc1 and act
    small = surgery.apply(model, spec)
    assert small.fc1.rank == 4
    # param_ratio counts the bias (kept as it is) on both sides
    assert small.fc2.rank == math.floor((0.5 * (48 * 48 + 48) - 48) / 96)


def test_a_later_rule_can_wrap_what_an_earlier_rule_built():
    reg = registry_with(wrap_transform())
    spec = spec_of(
        rule(["fc1", "fc2"]),
        rule("*", transform="wrap", types=["LowRankLinear"], params={"scale": 3.0}),
    )
    model, x = models.mlp(), torch.randn(4, 16)
    small = surgery.apply(model, spec, x, registry=reg)
    assert isinstance(small.fc1, Scaled) and isinstance(small.fc1.inner, LowRankLinear)
    assert isinstance(small.fc2, Scaled) and type(small.fc3) is nn.Linear
    manifest = surgery.get_manifest(small)
    records = [
        (r["rule_index"], r["name"], r["layer"].rsplit(".", 1)[-1], r["config"])
        for r in manifest["replacements"]
    ]
    assert records == [
        (0, "fc1", "LowRankLinear", small.fc1.inner.config()),
        (0, "fc2", "LowRankLinear", small.fc2.inner.config()),
        (1, "fc1", "Scaled", {"scale": 3.0}),
        (1, "fc2", "Scaled", {"scale": 3.0}),
    ]


def test_a_wrapped_model_saves_and_loads_back(tmp_path):
    reg = registry_with(wrap_transform())
    spec = spec_of(rule(["fc1", "fc2"]), rule("fc1", transform="wrap", types=["LowRankLinear"]))
    x = torch.randn(4, 16)
    small = surgery.apply(models.mlp(), spec, x, registry=reg)
    tnsurgery.save(small, tmp_path / "out")
    back = tnsurgery.load(tmp_path / "out", models.mlp(), registry=reg)
    assert isinstance(back.fc1, Scaled) and isinstance(back.fc1.inner, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# ------------------------------------------------------------------ refusals


def test_tied_weights_are_refused_and_stay_tied():
    model, x = models.tied(), torch.randn(3, 32)
    spec = spec_of(rule(["enc", "dec", "other"]))
    plan = surgery.plan(model, spec, x)
    status = {t.name: (t.status, t.reason) for t in plan.targets}
    assert status["enc"][0] == status["dec"][0] == "refuse"
    assert "tied" in status["enc"][1] and "dec" in status["enc"][1]
    assert "tied" in status["dec"][1] and "enc" in status["dec"][1]
    assert status["other"] == ("replace", None)
    small = surgery.apply(model, spec, x)
    assert type(small.enc) is nn.Linear and type(small.dec) is nn.Linear
    assert small.dec.weight is small.enc.weight
    assert isinstance(small.other, LowRankLinear)
    refused = {r["name"] for r in surgery.get_manifest(small)["not_replaced"]}
    assert refused == {"enc", "dec"}


def test_a_module_under_two_names_is_refused():
    plan = surgery.plan(models.aliased(), spec_of(rule(["first", "last"])), torch.randn(2, 32))
    first, last = plan.targets
    assert first.status == "refuse" and "second" in first.reason
    assert last.status == "replace"


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_a_module_called_twice_is_refused(method, monkeypatch):
    monkeypatch.setattr(surgery, "trace", functools.partial(tracing.trace, method=method))
    plan = surgery.plan(models.twice(), spec_of(rule(["inp", "fc"])), torch.randn(2, 16))
    inp, fc = plan.targets
    assert fc.status == "refuse" and fc.calls == 2
    assert "called 2 times" in fc.reason
    assert inp.status == "replace"


def test_a_module_called_twice_is_refused_by_fx_without_sample_input():
    small = surgery.apply(models.twice(), spec_of(rule(["inp", "fc"])))
    assert type(small.fc) is nn.Linear
    assert isinstance(small.inp, LowRankLinear)


def test_a_weight_read_outside_its_module_is_refused():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight

    plan = surgery.plan(ReadsWeight(), spec_of(rule("fc")))
    assert plan.targets[0].status == "refuse"
    assert "weight directly" in plan.targets[0].reason


# --------------------------------------------------------- matching nothing


def test_a_rule_matching_nothing_lists_close_names_and_allow_empty():
    with pytest.raises(MatchError) as info:
        surgery.plan(models.mlp(), spec_of(rule("fc4")))
    msg = str(info.value)
    assert msg.startswith("rule 0 (match 'fc4')")
    assert "fc1, fc2, fc3" in msg  # the closest names (difflib)
    assert '"allow_empty": true' in msg


def test_matching_only_other_types_says_so():
    with pytest.raises(MatchError, match="matched only modules of other types: act"):
        surgery.apply(models.mlp(), spec_of(rule("act")))


def test_a_second_rule_matching_nothing_names_that_rule():
    with pytest.raises(MatchError, match=r"rule 1 \(match 'head'\)"):
        surgery.plan(models.mlp(), spec_of(rule("fc1"), rule("head")))


def test_allow_empty_on_the_rule_or_the_call():
    model = models.mlp()
    spec = spec_of(rule("fc1"), rule("nothing.here", allow_empty=True))
    small = surgery.apply(model, spec)
    assert isinstance(small.fc1, LowRankLinear)
    assert surgery.get_manifest(small)["plan"]["passes"][1]["matched"] == 0
    plan = surgery.plan(model, spec_of(rule("nothing.here")), allow_empty=True)
    assert plan.targets == []
    same = surgery.apply(model, spec_of(rule("nothing.here")), allow_empty=True)
    assert surgery.get_manifest(same)["replacements"] == []


# ----------------------------------------------------------- failure = undo


@pytest.mark.parametrize("with_input", [False, True])
def test_a_failing_transform_leaves_an_inplace_model_as_it_was(with_input):
    reg = registry_with(failing_transform())
    model = models.mlp()
    before = snapshot(model)
    spec = spec_of(rule("fc1"), rule("fc2", transform="boom"))
    x = torch.randn(2, 16) if with_input else None
    with pytest.raises(SurgeryError, match="transform 'boom' failed to build fc2"):
        surgery.apply(model, spec, x, inplace=True, registry=reg)
    assert_unchanged(model, before)


def test_a_failure_midway_through_a_rule_undoes_its_earlier_swaps():
    reg = registry_with(failing_transform(fail_on=("fc3",)))
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(SurgeryError, match="boom on fc3"):
        surgery.apply(model, spec_of(rule("fc*", transform="boom")), inplace=True, registry=reg)
    assert_unchanged(model, before)


def test_a_second_rule_matching_nothing_leaves_an_inplace_model_as_it_was():
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(MatchError):
        surgery.apply(model, spec_of(rule("fc1"), rule("fc9")), inplace=True)
    assert_unchanged(model, before)


def test_an_observer_that_raises_leaves_an_inplace_model_as_it_was():
    class Raises:
        @hookimpl
        def after_surgery(self, model, plan, manifest):
            raise RuntimeError("observer failed")

    model = models.mlp()
    before = snapshot(model)
    pm = get_plugin_manager()
    obj = Raises()
    pm.register(obj)
    try:
        with pytest.raises(RuntimeError, match="observer failed"):
            surgery.apply(model, MLP_SPEC, torch.randn(2, 16), inplace=True)
    finally:
        pm.unregister(obj)
    assert_unchanged(model, before)


# ------------------------------------------------------------------ manifest


def test_manifest_records_measured_errors_against_independent_computations():
    model, x = models.mlp(), torch.randn(32, 16)
    spec = spec_of(rule(["fc1", "fc2"], params={"rank": 8}), rule("fc3", params={"energy": 0.99}))
    small = surgery.apply(model, spec, x)
    manifest = tnsurgery.get_manifest(small)

    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert manifest["output_error"] == pytest.approx(rel_error(y_small, y), rel=1e-9)
    assert 0 < manifest["output_error"] < 0.5
    assert manifest["output_error_name"] == "output"

    inputs = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0]  # returns None: the output is left alone

        return hook

    handles = [
        getattr(model, n).register_forward_hook(keep_input(n)) for n in ("fc1", "fc2", "fc3")
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()

    rep = {r["name"]: r for r in manifest["replacements"]}
    assert list(rep) == ["fc1", "fc2", "fc3"]
    s2 = torch.linalg.svdvals(model.fc3.weight.double()).square()
    energy_rank = int((torch.cumsum(s2, 0) / s2.sum() < 0.99 - 1e-12).sum()) + 1
    expected_rank = {"fc1": 8, "fc2": 8, "fc3": energy_rank}
    for name, r in rep.items():
        old, new = getattr(model, name), getattr(small, name)
        assert r["resolved"]["rank"] == expected_rank[name] == new.rank
        assert r["layer"] == "tnsurgery.layers.lowrank.LowRankLinear"
        assert r["config"] == new.config()
        with torch.no_grad():
            assert r["weight_error"] == pytest.approx(rel_error(new.to_dense(), old.weight), 1e-6)
            assert r["output_error"] == pytest.approx(
                rel_error(new(inputs[name]), old(inputs[name])), rel=1e-6
            )
        assert r["predicted_error"] == pytest.approx(r["weight_error"], rel=1e-3)
        assert r["weight_error"] == pytest.approx(
            optimal_error(old.weight, r["resolved"]["rank"]), 1e-3
        )
        assert r["params_after"] == sum(p.numel() for p in new.parameters())

    assert manifest["tnsurgery_version"] == tnsurgery.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["base_model"] == "tests.models.MLP"
    assert manifest["spec"] == load_spec(spec).to_dict()
    assert manifest["plan"]["applied"] is True
    assert manifest["plan"]["totals"]["output_error"] == manifest["output_error"]
    assert manifest["plan"]["totals"]["model_params_after"] == sum(
        p.numel() for p in small.parameters()
    )
    assert manifest["history"] == []
    json.dumps(manifest)  # JSON-compatible: it goes into every saved file


def test_manifest_without_sample_input_has_no_output_errors():
    small = surgery.apply(models.mlp(), MLP_SPEC)
    manifest = tnsurgery.get_manifest(small)
    assert manifest["output_error"] is None
    assert all(r["output_error"] is None for r in manifest["replacements"])
    assert all(r["weight_error"] > 0 for r in manifest["replacements"])


def test_output_error_over_a_tuple_output_is_the_worst_leaf():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x), "ids": x.argmax(-1)}

    model, x = TwoHeads(), torch.randn(8, 32)
    small = surgery.apply(model, spec_of(rule("b", params={"rank": 2})), x)
    manifest = tnsurgery.get_manifest(small)
    with torch.no_grad():
        expected = rel_error(small(x)["b"], model(x)["b"])
    assert manifest["output_error"] == pytest.approx(expected, rel=1e-9)
    assert manifest["output_error_name"] == "output.b"


def test_a_second_surgery_keeps_the_first_in_history():
    once = surgery.apply(models.mlp(), spec_of(rule("fc1")))
    twice = surgery.apply(once, spec_of(rule("fc2")))
    manifest = tnsurgery.get_manifest(twice)
    assert [r["name"] for r in manifest["replacements"]] == ["fc2"]
    assert len(manifest["history"]) == 1
    assert [r["name"] for r in manifest["history"][0]["replacements"]] == ["fc1"]
    assert [r["name"] for r in tnsurgery.get_manifest(once)["replacements"]] == ["fc1"]


def test_a_transform_building_an_undeclared_layer_is_an_error():
    bad = Transform(
        "bad", NoParams, (nn.Linear,), lambda m, p, ctx: nn.Identity(), layers=(LowRankLinear,)
    )
    with pytest.raises(SurgeryError, match="not one of its declared layers"):
        surgery.apply(
            models.mlp(), spec_of(rule("fc1", transform="bad")), registry=registry_with(bad)
        )


# --------------------------------------------------------------------- hooks


def test_before_and_after_surgery_hooks_are_called(observer):
    model = models.mlp()
    small = surgery.apply(model, MLP_SPEC, torch.randn(2, 16))
    assert [c[0] for c in observer.calls] == ["before", "after"]
    _, seen_model, fc1_type, n_targets = observer.calls[0]
    assert seen_model is small and fc1_type is nn.Linear and n_targets == 3
    _, seen_model, fc1_type, manifest = observer.calls[1]
    assert seen_model is small and fc1_type is LowRankLinear
    assert manifest == tnsurgery.get_manifest(small)


def test_plan_calls_no_surgery_hook(observer):
    surgery.plan(models.mlp(), spec_of(rule("fc1"), rule("fc2")), torch.randn(2, 16))
    assert observer.calls == []


def test_progress_is_reported_per_replacement():
    seen = []
    surgery.apply(models.mlp(), MLP_SPEC, progress=lambda *a: seen.append(a))
    assert seen == [
        (0, 3, "factorize fc1"),
        (1, 3, "factorize fc2"),
        (2, 3, "factorize fc3"),
    ]


def test_a_failed_inplace_apply_leaves_no_manifest_of_its_own():
    """Training fails after the swaps: the modules come back and so does the manifest."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    first = model[0]
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}],
        "training": {"data": {"source": "random", "shape": [5], "samples": 32}, "steps": 2},
    }
    with pytest.raises(RuntimeError):  # the batches do not fit the model
        surgery.apply(model, spec, inplace=True)
    assert model[0] is first and surgery.get_manifest(model) is None


def test_context_extras_is_a_read_only_view_for_older_plugins():
    from tnsurgery.stats import InputStats
    from tnsurgery.transform import Context

    stats = InputStats(torch.eye(3, dtype=torch.float64), 3)
    ctx = Context(name="x", input_stats=stats, damping=0.1, cache={})
    assert ctx.extras == {"input_stats": stats, "damping": 0.1, "decomposition_cache": {}}
    assert Context(name="y").extras == {}
