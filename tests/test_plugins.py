"""The plugin machinery: entry points, the registry, failures, and every hook.

Like datasette's ``test_docs.py``: every hookspec must have a docstring and a
``test_hook_<name>`` here that shows the code calls it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
from typing import Any

import click
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict
from torch import nn

import tnsurgery
from tnsurgery import hookspecs, plugins, surgery
from tnsurgery.cli import cli
from tnsurgery.decompositions.conv1d import Conv1D
from tnsurgery.errors import ModelLoadError, SpecError, SurgeryError
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.plugins import get_plugin_manager, get_registry
from tnsurgery.transform import Transform

# ------------------------------------------------------------ a test plugin


class CopiedLinear(SurgeryLayer):
    """A Linear copied as it is: the surgered model must compute exactly the same."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def flops(self, input_shape: tuple[int, ...]) -> int:
        rows = 1
        for d in input_shape[:-1]:
            rows *= d
        return 2 * rows * self.in_features * self.out_features

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def copy_linear(module: nn.Linear, params: NoParams, ctx) -> CopiedLinear:
    layer = CopiedLinear(module.in_features, module.out_features, module.bias is not None)
    layer.load_state_dict(module.state_dict())
    return layer


def transform(name: str, build=copy_linear, layers=(CopiedLinear,)) -> Transform:
    return Transform(
        name=name,
        params_model=NoParams,
        module_types=(nn.Linear,),
        build=build,
        layers=layers,
        description=f"test transform {name}",
    )


class TransformsPlugin:
    """Registers the given transforms."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    @tnsurgery.hookimpl
    def register_transforms(self, register):
        for t in self.transforms:
            register(t)


class Recorder:
    """Records the surgery hooks, with what the model looked like at the time."""

    def __init__(self, fail_in: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail_in = fail_in

    @tnsurgery.hookimpl
    def before_surgery(self, model, plan):
        self.calls.append(
            (
                "before",
                {
                    "model": model,
                    "types": [type(m).__name__ for m in model],
                    "targets": [(t.name, t.status) for t in plan.targets],
                    "applied": plan.applied,
                },
            )
        )
        if self.fail_in == "before":
            raise RuntimeError("observer failed")

    @tnsurgery.hookimpl
    def after_surgery(self, model, plan, manifest):
        self.calls.append(
            (
                "after",
                {
                    "model": model,
                    "types": [type(m).__name__ for m in model],
                    "plan": plan,
                    "manifest": manifest,
                    "weight_errors": [t.weight_error for t in plan.targets],
                },
            )
        )
        if self.fail_in == "after":
            raise RuntimeError("observer failed")


@pytest.fixture
def register_plugin():
    """``register_plugin(obj, name)`` registers a plugin for one test only."""
    pm = get_plugin_manager()
    names: list[str] = []

    def register(obj, name: str):
        pm.register(obj, name=name)
        names.append(name)
        return obj

    try:
        yield register
    finally:
        for name in names:
            if pm.has_plugin(name):
                pm.unregister(name=name)


@pytest.fixture
def restore_manager():
    """Rebuild the process-wide plugin manager from the real entry points afterwards."""
    try:
        yield
    finally:
        get_plugin_manager(refresh=True)


@pytest.fixture
def copy_plugin(register_plugin):
    """The ``copy`` transform, registered for one test."""
    return register_plugin(TransformsPlugin(transform("copy")), name="copy-plugin")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


COPY_SPEC = {"rules": [{"match": "0", "transform": "copy"}]}


# ------------------------------------------------------- discovery, builtins


def test_builtins_are_registered_through_the_entry_point_group():
    eps = importlib.metadata.entry_points(group=plugins.GROUP, name="factorize")
    assert [(ep.value, ep.dist.name) for ep in eps] == [
        ("tnsurgery.transforms.factorize", "tnsurgery")
    ]
    pm = get_plugin_manager()
    from tnsurgery.transforms import factorize

    assert pm.get_plugin("factorize") is factorize
    # found once, not a second time through the DEFAULT_PLUGINS fallback
    impls = [i for i in pm.hook.register_transforms.get_hookimpls() if i.plugin is factorize]
    assert len(impls) == 1
    reg = get_registry()
    assert reg.origins["factorize"] == "builtin"
    assert reg.get("factorize").name == "factorize"
    assert reg.failures == []


def test_builtins_without_entry_point_metadata(monkeypatch, restore_manager):
    """From a source tree that was never installed, the built-ins still register."""
    with monkeypatch.context() as m:
        m.setattr(plugins.importlib.metadata, "entry_points", lambda **kw: [])
        pm = get_plugin_manager(refresh=True)
        reg = get_registry(pm)
    assert reg.origins == {name: "builtin" for name in ("factorize", "tt", "cp", "tucker", "qat")}
    sources = ("tensors", "callable", "text", "random", "sentences")
    assert reg.data_origins == {s: "builtin" for s in sources}


def test_unknown_transform_name_suggests_the_closest():
    with pytest.raises(KeyError) as info:
        get_registry().get("fatorize")
    assert "unknown transform 'fatorize'; did you mean 'factorize'?" in info.value.args[0]


# ------------------------------------------------------- a registered plugin


def test_registered_plugin_adds_a_transform_usable_from_a_spec(copy_plugin, tmp_path):
    reg = get_registry()
    assert reg.origins["copy"] == "copy-plugin"
    assert reg.layer_classes()[f"{__name__}.CopiedLinear"] is CopiedLinear

    model = mlp()
    x = torch.randn(3, 8)
    small = surgery.apply(model, COPY_SPEC, x)
    assert isinstance(small[0], CopiedLinear) and isinstance(model[0], nn.Linear)
    assert torch.equal(small(x), model(x))
    manifest = surgery.get_manifest(small)
    assert manifest["replacements"][0]["transform"] == "copy"
    assert manifest["replacements"][0]["layer"] == f"{__name__}.CopiedLinear"
    assert manifest["replacements"][0]["weight_error"] == 0.0
    assert manifest["output_error"] == 0.0

    # tnsurgery.load builds the plugin's layer while the plugin is registered...
    path = tnsurgery.save(small, tmp_path / "out")
    loaded = tnsurgery.load(path, mlp())
    assert isinstance(loaded[0], CopiedLinear)
    assert torch.equal(loaded(x), small(x))
    # ...and refuses to instantiate it once no registered plugin declares it
    get_plugin_manager().unregister(name="copy-plugin")
    with pytest.raises(ModelLoadError, match="is not provided by any installed plugin"):
        tnsurgery.load(path, mlp())


def test_second_registration_of_a_name_is_a_failure_not_a_crash(register_plugin):
    register_plugin(TransformsPlugin(transform("factorize")), name="impostor")
    reg = get_registry()
    assert reg.origins["factorize"] == "builtin"
    assert reg.get("factorize").module_types == (nn.Linear, nn.Conv2d, Conv1D)  # the builtin
    [failure] = [f for f in reg.failures if f.name == "impostor"]
    assert failure.error == "ValueError: transform 'factorize' is already registered by builtin"

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "failed to load impostor (impostor): ValueError" in result.output


def test_a_failing_plugin_does_not_hide_the_others(register_plugin):
    register_plugin(TransformsPlugin(transform("copy")), name="good")
    register_plugin(TransformsPlugin("not a transform"), name="bad")  # type: ignore[arg-type]
    reg = get_registry()
    assert "copy" in reg.transforms and "factorize" in reg.transforms
    assert [(f.name, f.error) for f in reg.failures] == [
        ("bad", "TypeError: register() expects a Transform, got str")
    ]


IMPOSTOR = TransformsPlugin(transform("factorize"))


def test_a_builtin_name_stays_builtin_whatever_the_install_order(monkeypatch, restore_manager):
    """A third-party plugin found before the built-ins cannot take a built-in's name."""
    real = importlib.metadata.entry_points
    impostor = importlib.metadata.EntryPoint(
        name="impostor", value=f"{__name__}:IMPOSTOR", group=plugins.GROUP
    )

    def entry_points(**kw):
        found = list(real(**kw))
        return [impostor, *found] if kw.get("group") == plugins.GROUP else found

    with monkeypatch.context() as m:
        m.setattr(plugins.importlib.metadata, "entry_points", entry_points)
        pm = get_plugin_manager(refresh=True)
    reg = get_registry(pm)
    assert reg.origins["factorize"] == "builtin"
    assert reg.get("factorize").module_types == (nn.Linear, nn.Conv2d, Conv1D)
    assert [f.name for f in reg.failures] == ["impostor"]


def _with_broken_entry_point(m: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(
        name="broken", value="no_such_module_xyz", group=plugins.GROUP
    )

    def entry_points(**kw):
        found = list(real(**kw))
        return [*found, broken] if kw.get("group") == plugins.GROUP else found

    m.setattr(plugins.importlib.metadata, "entry_points", entry_points)


def test_plugin_that_fails_to_import_is_reported(monkeypatch, restore_manager):
    with monkeypatch.context() as m:
        _with_broken_entry_point(m)
        with pytest.warns(UserWarning, match="tnsurgery plugin 'broken'"):
            pm = get_plugin_manager(refresh=True)
    reg = get_registry(pm)
    assert [(f.name, f.error) for f in reg.failures] == [
        ("broken", "ModuleNotFoundError: No module named 'no_such_module_xyz'")
    ]
    assert reg.origins["factorize"] == "builtin"  # the others still load

    runner = CliRunner()
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "factorize" in result.output
    assert "failed to load broken" in result.output
    assert "No module named 'no_such_module_xyz'" in result.output
    as_json = runner.invoke(cli, ["plugins", "--json"])
    assert as_json.exit_code == 0
    assert '"name": "broken"' in as_json.stdout


def test_main_warns_about_a_broken_plugin_and_runs(monkeypatch, restore_manager, capsys):
    with monkeypatch.context() as m:
        _with_broken_entry_point(m)
        with pytest.warns(UserWarning):
            get_plugin_manager(refresh=True)
    monkeypatch.setattr(sys, "argv", ["tnsurgery", "plugins"])
    from tnsurgery.cli import main

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    captured = capsys.readouterr()
    assert "plugin 'broken'" in captured.err and "failed to load" in captured.err
    assert "factorize" in captured.out


# ------------------------------------------------------------------ the hooks


def hookspec_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, f"{plugins.GROUP}_spec")
    )


def test_there_are_hookspecs():
    assert {"register_transforms", "before_surgery", "after_surgery", "register_commands"} <= set(
        hookspec_names()
    )


@pytest.mark.parametrize("name", hookspec_names())
def test_every_hookspec_is_documented_and_tested(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and len(doc.split()) >= 10, f"hookspec {name} needs a docstring"
    assert hasattr(get_plugin_manager().hook, name)
    assert callable(globals().get(f"test_hook_{name}")), f"no test_hook_{name} in this file"


def test_hook_register_transforms(register_plugin):
    calls = []

    class Plugin:
        @tnsurgery.hookimpl
        def register_transforms(self, register):
            calls.append(register)
            register(transform("copy"))
            register(transform("copy2"))

    register_plugin(Plugin(), name="two")
    reg = get_registry()
    assert len(calls) == 1
    assert reg.origins["copy"] == reg.origins["copy2"] == "two"


def test_hook_before_surgery(register_plugin, copy_plugin):
    rec = register_plugin(Recorder(), name="recorder")
    model = mlp()
    small = surgery.apply(model, COPY_SPEC, torch.randn(2, 8))
    assert [c[0] for c in rec.calls] == ["before", "after"]
    before = rec.calls[0][1]
    assert before["model"] is small and before["model"] is not model  # the copy
    assert before["types"] == ["Linear", "ReLU", "Linear"]  # nothing replaced yet
    assert before["targets"] == [("0", "replace")] and before["applied"] is False


def test_hook_after_surgery(register_plugin, copy_plugin):
    rec = register_plugin(Recorder(), name="recorder")
    small = surgery.apply(mlp(), COPY_SPEC, torch.randn(2, 8))
    after = rec.calls[-1][1]
    assert after["model"] is small
    assert after["types"] == ["CopiedLinear", "ReLU", "Linear"]
    assert after["plan"].applied and after["plan"].output_error == 0.0
    assert after["weight_errors"] == [0.0]
    assert after["manifest"] == surgery.get_manifest(small)


def test_before_surgery_sees_the_first_pass_before_any_swap(register_plugin, copy_plugin):
    """With several rules, before_surgery runs once, before anything is replaced, with
    the plan of the first pass (later passes are planned on the model they see)."""
    rec = register_plugin(Recorder(), name="recorder")
    spec = {"rules": [{"match": "0", "transform": "copy"}, {"match": "2", "transform": "copy"}]}
    surgery.apply(mlp(), spec)
    before = rec.calls[0][1]
    assert before["types"] == ["Linear", "ReLU", "Linear"]
    assert before["targets"] == [("0", "replace")]
    assert [c[0] for c in rec.calls] == ["before", "after"]


def test_plan_calls_no_surgery_hook(register_plugin):
    rec = register_plugin(Recorder(), name="recorder")
    surgery.plan(
        mlp(), {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}]}
    )
    assert rec.calls == []


@pytest.mark.parametrize("fail_in", ["before", "after"])
def test_an_observer_that_raises_leaves_the_model_as_it_was(register_plugin, copy_plugin, fail_in):
    register_plugin(Recorder(fail_in=fail_in), name="recorder")
    model = mlp()
    first = model[0]
    with pytest.raises(RuntimeError, match="observer failed"):
        surgery.apply(model, COPY_SPEC, inplace=True)
    assert model[0] is first
    assert surgery.get_manifest(model) is None


def test_hook_register_commands(register_plugin, monkeypatch, capsys):
    class Plugin:
        @tnsurgery.hookimpl
        def register_commands(self, cli):
            @cli.command()
            def hello():
                """Say hello."""
                click.echo("hello from a plugin")

    register_plugin(Plugin(), name="commands")

    group = click.Group()
    get_plugin_manager().hook.register_commands(cli=group)
    result = CliRunner().invoke(group, ["hello"])
    assert result.exit_code == 0 and result.output == "hello from a plugin\n"

    # the real entry point of the script calls the hook before running the CLI
    from tnsurgery.cli import main

    monkeypatch.setattr(sys, "argv", ["tnsurgery", "hello"])
    try:
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code in (0, None)
        assert capsys.readouterr().out == "hello from a plugin\n"
    finally:
        cli.commands.pop("hello", None)


def test_hook_register_data_sources(register_plugin):
    from tnsurgery.data import DataSource

    class OnesParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int

    seen = {}

    def ones(params, ctx):
        seen["batch_size"] = ctx.batch_size
        for _ in range(3):
            yield torch.ones(ctx.batch_size, params.width)

    class Plugin:
        @tnsurgery.hookimpl
        def register_data_sources(self, register):
            register(DataSource("ones", OnesParams, ones, "All ones."))

    register_plugin(Plugin(), name="ones-data")
    reg = get_registry()
    assert reg.data_origins["ones"] == "ones-data"
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}],
        "calibration": {"data": {"source": "ones", "width": 6}, "samples": 10, "batch_size": 4},
    }
    p = surgery.plan(model, spec, registry=reg)
    assert p.calibration["examples"] == 10 and p.calibration["batches"] == 3
    assert seen["batch_size"] == 4
    # its params are validated like a transform's
    bad = {**spec, "calibration": {"data": {"source": "ones", "widht": 6}}}
    with pytest.raises(SpecError, match="did you mean 'width'"):
        surgery.plan(model, bad, registry=reg)


def test_hook_register_trainers(register_plugin):
    from tnsurgery.training import Trainer, TrainResult

    calls = []

    def my_loop(model, training, teacher, *, registry, progress, resume):
        calls.append((training.steps, teacher is not None))
        return TrainResult(steps=training.steps)

    class Plugin:
        @tnsurgery.hookimpl
        def register_trainers(self, register):
            register(Trainer("mine", my_loop, "A third party's loop."))

    register_plugin(Plugin(), name="my-trainer")
    reg = get_registry()
    assert reg.trainer_origins == {"builtin": "builtin", "mine": "my-trainer"}
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}],
        "training": {"trainer": "mine", "data": {"source": "random", "shape": [6]}, "steps": 7},
    }
    surgery.apply(model, spec, registry=reg)
    assert calls == [(7, True)]
    spec["training"]["trainer"] = "mien"
    with pytest.raises(SpecError, match="did you mean 'mine'"):
        surgery.apply(model, spec, registry=reg)


class Gated(nn.Module):
    """A fused module: two Linears kept in one weight, neither called on its own (what
    a third party's split takes apart)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * d, d) / d**0.5)

    def forward(self, x):
        a, b = F.linear(x, self.weight).chunk(2, -1)
        return a * torch.sigmoid(b)


class SplitGated(nn.Module):
    """``Gated`` with its two halves as Linear children."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.d = d
        self.value, self.gate = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.value(x) * torch.sigmoid(self.gate(x))

    def config(self) -> dict:
        return {"d": self.d}

    @classmethod
    def from_config(cls, config: dict, current=None) -> SplitGated:
        return cls(**config)

    @classmethod
    def of(cls, fused: Gated) -> SplitGated:
        new = cls(fused.weight.shape[1])
        with torch.no_grad():
            new.value.weight.copy_(fused.weight[: new.d])
            new.gate.weight.copy_(fused.weight[new.d :])
        return new


def test_hook_register_splits(register_plugin, copy_plugin, tmp_path):
    class Plugin:
        @tnsurgery.hookimpl
        def register_splits(self, register):
            register(
                hookspecs.Split(
                    name="gated",
                    module_types=(Gated,),
                    parts=("value", "gate"),
                    split=SplitGated.of,
                    layers=(SplitGated,),
                )
            )

    register_plugin(Plugin(), name="gated-plugin")
    reg = get_registry()
    assert reg.split_origins["gated"] == "gated-plugin"
    assert reg.split_origins["multihead_attention"] == "builtin"
    assert reg.layer_classes()[f"{__name__}.SplitGated"] is SplitGated

    def model():
        torch.manual_seed(0)
        return nn.Sequential(Gated(), nn.ReLU(), Gated())

    x = torch.randn(4, 8)
    spec = {"rules": [{"match": "0.value", "transform": "copy"}]}
    small = surgery.apply(model(), spec, x)
    assert isinstance(small[0], SplitGated) and isinstance(small[2], Gated)  # 2: not asked for
    assert isinstance(small[0].value, CopiedLinear) and type(small[0].gate) is nn.Linear
    manifest = surgery.get_manifest(small)
    assert [(r["name"], r.get("operation")) for r in manifest["replacements"]] == [
        ("0", "split"),
        ("0.value", None),
    ]
    assert manifest["output_error"] == 0.0  # the split is exact, and so is the copy
    path = tnsurgery.save(small, tmp_path / "gated")
    loaded = tnsurgery.load(path, model())
    assert isinstance(loaded[0], SplitGated) and torch.equal(loaded(x), small(x))
    get_plugin_manager().unregister(name="gated-plugin")
    with pytest.raises(ModelLoadError, match="SplitGated .* is not provided by any installed"):
        tnsurgery.load(path, model())
    # without the plugin the fused module is no target: its parts do not exist
    plan = surgery.plan(model(), {**spec, "rules": [{**spec["rules"][0], "allow_empty": True}]})
    assert plan.targets == []


# --------------------------------------------------------- transform contract


def test_build_returning_an_undeclared_layer_is_a_surgery_error(register_plugin):
    bad = transform("bad", build=lambda module, params, ctx: nn.Identity())
    register_plugin(TransformsPlugin(bad), name="bad-plugin")
    model = mlp()
    first = model[0]
    with pytest.raises(SurgeryError) as info:
        surgery.apply(model, {"rules": [{"match": "0", "transform": "bad"}]}, inplace=True)
    assert str(info.value) == (
        "transform 'bad' built a Identity for 0, which is not one of its declared layers "
        "(CopiedLinear)"
    )
    assert model[0] is first


def test_build_that_raises_is_a_surgery_error(register_plugin):
    def boom(module, params, ctx):
        raise RuntimeError("boom")

    register_plugin(TransformsPlugin(transform("boom", build=boom)), name="boom-plugin")
    with pytest.raises(SurgeryError, match="transform 'boom' failed to plan 0: RuntimeError: boom"):
        surgery.apply(mlp(), {"rules": [{"match": "0", "transform": "boom"}]})
