"""The pipeline never misreports, never unties weights silently, gives an in-place model
back exactly when any step fails, and names a data source that fails (issue 12)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tnsurgery import surgery
from tnsurgery.builtins import trainer as builtin_trainer
from tnsurgery.cli import cli
from tnsurgery.errors import DataSourceError, SurgeryError, UserInputError
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec import Training
from tnsurgery.tracing import sharing
from tnsurgery.training import evaluate

FACTORIZE = {"match": "[02]", "transform": "factorize", "params": {"rank": 6}}
RANDOM = {"source": "random", "shape": [16], "samples": 64}
# the callable source imports this module again by name: flaky_batches is a pure function
FLAKY = {"source": "callable", "target": "tests.security.test_pipeline:flaky_batches"}


def flaky_batches(batch_size: int = 8, good: int = 1) -> Iterator[torch.Tensor]:
    """``good`` batches, then the source breaks (as a network or a disk does)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(good):
        yield torch.randn(batch_size, 16, generator=g)
    raise RuntimeError("the disk went away")


def flaky(good: int = 1) -> dict:
    return {**FLAKY, "kwargs": {"good": good}}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    ).eval()


# ------------------------------------------------------- the state, exactly


class Snapshot:
    """Everything an in-place apply must give back: values (bit for bit), the module and
    tensor objects, requires_grad flags, modes and the manifest."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = {name: id(m) for name, m in model.named_modules()}
        self.tensors = {n: id(p) for n, p in model.named_parameters()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.manifest = json.dumps(surgery.get_manifest(model), sort_keys=True)
        self.attrs = set(model.__dict__)

    def assert_unchanged(self) -> None:
        model = self.model
        now = model.state_dict()
        assert now.keys() == self.state.keys()
        changed = [k for k, v in self.state.items() if not torch.equal(now[k], v)]
        assert not changed, f"changed: {changed}"
        assert {n: id(m) for n, m in model.named_modules()} == self.modules
        assert {n: id(p) for n, p in model.named_parameters()} == self.tensors
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.flags
        assert {n: m.training for n, m in model.named_modules()} == self.modes
        assert json.dumps(surgery.get_manifest(model), sort_keys=True) == self.manifest
        assert set(model.__dict__) == self.attrs


def surgered() -> nn.Module:
    """A model that already has a manifest (its last layer factorized)."""
    return surgery.apply(
        mlp(), {"rules": [{"match": "4", "transform": "factorize", "params": {"rank": 3}}]}
    )


def test_an_inplace_apply_whose_data_fails_in_training_gives_everything_back():
    model = surgered()
    model[4].u.requires_grad_(False)  # a flag of the user's, kept
    before = Snapshot(model)
    spec = {
        "rules": [FACTORIZE],
        "training": {
            "data": flaky(good=2),
            "steps": 5,
            "batch_size": 8,
            "lr": 1e-1,
            "trainable": "all",  # the layers surgery does not replace train too
        },
    }
    with pytest.raises(DataSourceError, match="the disk went away"):
        surgery.apply(model, spec, torch.randn(4, 16), inplace=True)
    before.assert_unchanged()
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)


def test_an_inplace_apply_failing_after_a_rank_cut_leaves_nothing_behind():
    model = mlp()
    before = Snapshot(model)
    spec = {
        "rules": [FACTORIZE],
        "training": {
            "data": flaky(good=4),
            "steps": 6,
            "batch_size": 8,
            "progressive_rank": {"final": 0.5, "stages": 3},
        },
    }
    with pytest.raises(DataSourceError):
        surgery.apply(model, spec, inplace=True)
    before.assert_unchanged()  # no manifest, no start ranks left on the model
    assert surgery.get_manifest(model) is None


def registry_with(*transforms) -> Registry:
    base = get_registry()
    reg = dataclasses.replace(base, transforms=dict(base.transforms), origins=dict(base.origins))
    for t in transforms:
        reg.transforms[t.name] = t
        reg.origins[t.name] = "tests"
    return reg


def broken_forward(module, args, output):
    raise ValueError("the layer computes nothing")


def factorize_failing(name: str, *, plan_on=(), build_on=(), forward_on=()):
    """``factorize`` under another name, failing to plan, to build, or in the forward of
    the layer it builds, for the named modules."""
    base = get_registry().get("factorize")

    def plan(module, params, ctx):
        if ctx.name in plan_on:
            raise ValueError(f"cannot plan {ctx.name}")
        return base.plan(module, params, ctx)

    def build(module, params, ctx):
        if ctx.name in build_on:
            raise ValueError(f"cannot build {ctx.name}")
        layer = base.build(module, params, ctx)
        if ctx.name in forward_on:
            layer.register_forward_hook(broken_forward)
        return layer

    return dataclasses.replace(base, name=name, plan=plan, build=build)


STAGES = {
    "calibration": ({"calibration": {"data": flaky(), "samples": 32}}, None, DataSourceError),
    "budget": (
        {"budget": {"params": 0.5}},
        factorize_failing("broken", plan_on=("2",)),
        SurgeryError,
    ),
    "build": ({}, factorize_failing("broken", build_on=("2",)), SurgeryError),
    "verification": ({}, factorize_failing("broken", forward_on=("2",)), SurgeryError),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_inplace_apply_failing_at_any_stage_gives_everything_back(stage):
    extra, transform, error = STAGES[stage]
    rule = {"match": "[02]", "transform": "factorize", "params": {"rank": 6}}
    if transform is not None:
        rule = {**rule, "transform": transform.name}
    if "budget" in extra:
        rule = {**rule, "params": {}}
    reg = registry_with(transform) if transform is not None else None
    model = surgered()
    before = Snapshot(model)
    with pytest.raises(error):
        surgery.apply(
            model, {"rules": [rule], **extra}, torch.randn(4, 16), inplace=True, registry=reg
        )
    before.assert_unchanged()


def test_distill_then_compress_failing_in_training_leaves_model_and_teacher_as_they_were():
    model, teacher = mlp(), mlp(1)
    spec = {
        "rules": [FACTORIZE],
        "training": {"data": flaky(good=2), "steps": 4, "order": "distill_then_compress"},
    }
    mine, theirs = Snapshot(model), Snapshot(teacher)
    with pytest.raises(DataSourceError):
        surgery.apply(model, spec, teacher=teacher)
    with pytest.raises(UserInputError, match="inplace"):
        surgery.apply(model, spec, teacher=teacher, inplace=True)
    mine.assert_unchanged()
    theirs.assert_unchanged()


# ------------------------------------------------------ a failing data source


@pytest.mark.parametrize("where", ["calibration", "training"])
def test_a_failing_data_source_is_a_user_input_error_naming_it(where):
    section = (
        {"calibration": {"data": flaky(), "samples": 64}}
        if where == "calibration"
        else {"training": {"data": flaky(), "steps": 3, "batch_size": 8}}
    )
    with pytest.raises(DataSourceError) as info:
        surgery.apply(mlp(), {"rules": [FACTORIZE], **section})
    assert isinstance(info.value, UserInputError)
    text = str(info.value)
    assert "data source 'callable'" in text and FLAKY["target"] in text
    assert "RuntimeError: the disk went away" in text
    assert isinstance(info.value.cause, RuntimeError)


@pytest.mark.parametrize("where", ["calibration", "training"])
def test_cli_exits_2_when_a_data_source_fails(tmp_path, where):
    torch.save(mlp(), tmp_path / "model.pt")
    section = (
        {"calibration": {"data": flaky(), "samples": 64}}
        if where == "calibration"
        else {"training": {"data": flaky(), "steps": 3, "batch_size": 8}}
    )
    (tmp_path / "spec.json").write_text(json.dumps({"rules": [FACTORIZE], **section}))
    r = CliRunner().invoke(cli, ["apply", str(tmp_path / "spec.json"), str(tmp_path / "model.pt")])
    assert r.exit_code == 2, r.output
    assert "the disk went away" in r.output and "callable" in r.output


def test_a_source_that_fails_when_called_is_named_too():
    spec = {"rules": [FACTORIZE], "calibration": {"data": {**FLAKY, "kwargs": {"nope": 1}}}}
    with pytest.raises(DataSourceError) as info:
        surgery.apply(mlp(), spec)
    text = str(info.value)
    assert "data source 'callable'" in text and FLAKY["target"] in text and "'nope'" in text


# ------------------------------------------------------------ keep_best


def progressive_run(ckpt, stop_at=None):
    torch.manual_seed(0)
    teacher = mlp()
    model = surgery.apply(
        teacher, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 8}}]}
    )
    opts = Training(
        data=RANDOM,
        steps=6,
        batch_size=16,
        lr=1e-2,
        progressive_rank={"final": 0.25, "stages": 3},
        checkpoint={"every": 1, "dir": str(ckpt)},
        eval_every=1,
        eval_data={**RANDOM, "samples": 32},
    )

    def progress(step, total, metrics):
        if step == stop_at:
            raise KeyboardInterrupt

    try:
        result = surgery.train(model, opts, teacher, progress=progress)
    except KeyboardInterrupt:
        return None
    return model, teacher, opts, result


def test_progressive_rank_resumes_from_a_checkpoint_at_a_stage_boundary(tmp_path):
    # stopped at step 5: the last checkpoint is the one after step 4, where a cut begins
    assert progressive_run(tmp_path / "a", stop_at=5) is None
    resumed, teacher, opts, result = progressive_run(tmp_path / "a")
    straight, _, _, whole = progressive_run(tmp_path / "b")
    assert result.resumed_from == 4 and resumed[0].rank == straight[0].rank == 2
    a, b = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the state kept is the one reported: its metric is measured again, exactly
    assert result.kept == "best" and result.kept_reason is None
    assert (result.best_step, result.best_metric) == (whole.best_step, whole.best_metric)
    assert evaluate(resumed, teacher, opts) == result.best_metric


def test_keep_best_never_reports_a_state_it_did_not_restore(monkeypatch):
    teacher = mlp()
    model = surgery.apply(teacher, {"rules": [{**FACTORIZE, "match": "0"}]})
    metrics = iter([0.9, 0.5, 0.1])  # the first state is the best
    monkeypatch.setattr(builtin_trainer, "evaluate", lambda *a, **k: next(metrics))
    last = {}

    def progress(step, total, values):
        if step == total:  # ranks cut after the best was kept (shapes differ now)
            model[0].truncate_(3)
            last.update({k: v.clone() for k, v in model.state_dict().items()})

    opts = Training(
        data=RANDOM,
        steps=3,
        batch_size=16,
        lr=1e-2,
        trainable="all",
        eval_every=1,
        eval_data=RANDOM,
    )
    result = surgery.train(model, opts, teacher, progress=progress)
    assert result.kept == "last"
    assert "best state (step 1" in result.kept_reason and "cannot be restored" in result.kept_reason
    assert "0.u" in result.kept_reason  # which tensor changed shape
    assert result.best_metric is None and result.best_step is None
    now = model.state_dict()
    assert now.keys() == last.keys() and all(torch.equal(now[k], last[k]) for k in last)
    record = surgery.get_manifest(model)["training"]
    assert record["kept"] == "last" and record["best_step"] is None
    assert [e["cosine"] for e in record["evals"]] == [0.9, 0.5, 0.1]  # still all there


def test_keep_best_says_when_it_restored_the_best():
    teacher = mlp()
    model = surgery.apply(teacher, {"rules": [FACTORIZE]})
    opts = Training(
        data=RANDOM, steps=4, batch_size=16, eval_every=2, eval_data={**RANDOM, "samples": 32}
    )
    result = surgery.train(model, opts, teacher)
    assert result.kept == "best" and result.best_step in (2, 4)
    assert evaluate(model, teacher, opts) == result.best_metric
    no_eval = opts.model_copy(update={"eval_every": None, "eval_data": None})
    plain = surgery.train(model, no_eval, teacher)
    assert plain.kept == "last" and "no evaluation" in plain.kept_reason


# -------------------------------------------------------- the budget's numbers


def test_a_budget_curve_that_cannot_be_planned_names_the_layer():
    reg = registry_with(factorize_failing("broken", plan_on=("2",)))
    spec = {
        "rules": [{"match": "[02]", "transform": "broken", "params": {}}],
        "budget": {"params": 0.5},
    }
    for sample in (None, torch.randn(4, 16)):
        with pytest.raises(
            SurgeryError, match=r"budget: .*'broken' failed to plan 2 .*cannot plan 2"
        ):
            surgery.plan(mlp(), spec, sample, registry=reg)


def test_a_sensitivity_that_cannot_be_measured_names_the_layer():
    spec = {
        "rules": [{"match": "[02]", "transform": "broken", "params": {}}],
        "budget": {"params": 0.5},
    }
    reg = registry_with(factorize_failing("broken", build_on=("2",)))
    with pytest.raises(SurgeryError, match=r"sensitivity of 2 .*ValueError: cannot build 2"):
        surgery.plan(mlp(), spec, torch.randn(4, 16), registry=reg)
    reg = registry_with(factorize_failing("broken", forward_on=("0",)))
    with pytest.raises(SurgeryError, match=r"sensitivity of 0 .*model failed with the layer"):
        surgery.plan(mlp(), spec, torch.randn(4, 16), registry=reg)
    # without a sample input nothing is measured: every layer weighs the same
    p = surgery.plan(mlp(), spec, registry=reg)
    assert p.budget["sensitivity"] == "none"
    assert {x["sensitivity"] for x in p.budget["layers"]} == {1.0}


def test_the_budget_lists_the_layers_it_leaves_out_and_why():
    model = StorageTied("same")
    rule = {"match": "*", "types": ["Linear"], "transform": "factorize", "params": {}}
    p = surgery.plan(model, {"rules": [rule], "budget": {"params": 0.5}}, torch.randn(4, 32))
    excluded = {x["name"]: x["reason"] for x in p.budget["excluded"]}
    assert set(excluded) == {"a", "b"}
    assert "b" in excluded["a"] and "a" in excluded["b"]
    assert [x["name"] for x in p.budget["layers"]] == ["other"]
    measured = p.budget["layers"][0]
    assert measured["sensitivity"] > 0 and measured["sensitivity_ratio"] == 0.5


# ------------------------------------------------- ties through shared storage


class StorageTied(nn.Module):
    """``b``'s weight is another Parameter on ``a``'s storage: the same tensor, its
    transpose, or (``"apart"``) a disjoint half of one flat tensor (no tie)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.other = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        if kind == "same":
            self.b.weight = nn.Parameter(self.a.weight.data)
        elif kind == "transposed":
            self.b.weight = nn.Parameter(self.a.weight.data.t())
        elif kind == "row":
            self.b.weight = nn.Parameter(self.a.weight.data[:1].expand(32, 32))
        else:
            flat = torch.randn(2 * 32 * 32) / 32
            self.a.weight = nn.Parameter(flat[: 32 * 32].view(32, 32))
            self.b.weight = nn.Parameter(flat[32 * 32 :].view(32, 32))

    def forward(self, x):
        return self.other(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("kind", ["same", "transposed", "row"])
def test_sharing_finds_ties_through_storage(kind):
    model = StorageTied(kind)
    assert model.a.weight is not model.b.weight
    _, tied = sharing(model)
    assert tied == {"a": ["b"], "b": ["a"]}


def test_disjoint_views_of_one_tensor_are_not_ties():
    _, tied = sharing(StorageTied("apart"))
    assert tied == {}


@pytest.mark.parametrize("kind", ["same", "transposed"])
def test_storage_ties_are_refused_by_plan_and_apply(kind):
    model, x = StorageTied(kind), torch.randn(4, 32)
    spec = {
        "rules": [
            {"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 4}}
        ]
    }
    p = surgery.plan(model, spec, x)
    status = {t.name: (t.status, t.reason) for t in p.targets}
    assert status["a"][0] == status["b"][0] == "refuse"
    assert "tied" in status["a"][1] and "b" in status["a"][1]
    assert "tied" in status["b"][1] and "a" in status["b"][1]
    assert status["other"] == ("replace", None)
    small = surgery.apply(model, spec, x)
    assert type(small.a) is nn.Linear and type(small.b) is nn.Linear
    with torch.no_grad():  # still one storage: a change of one is a change of the other
        small.a.weight[0, 1] += 1.0
    expected = small.a.weight if kind == "same" else small.a.weight.t()
    assert torch.equal(small.b.weight, expected)
    refused = {r["name"] for r in surgery.get_manifest(small)["not_replaced"]}
    assert refused == {"a", "b"}


def test_spec_named_training_files_never_touch_what_is_not_ours(tmp_path):
    """training.log and checkpoint.dir come from a spec file: they may not append to,
    trim or fill someone else's file or directory."""
    from tnsurgery.errors import UserInputError

    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=/usr/bin\n")
    data = {"source": "random", "shape": [16], "samples": 8}
    for training in (
        {"data": data, "steps": 2, "log": str(precious)},
        {"data": data, "steps": 2, "checkpoint": {"dir": str(tmp_path), "every": 1}},
    ):
        spec = {
            "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
            "training": training,
        }
        with pytest.raises(UserInputError, match="not a tnsurgery|not tnsurgery"):
            surgery.apply(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), spec)
    assert precious.read_text() == "export PATH=/usr/bin\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bashrc"]
