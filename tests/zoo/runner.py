"""One cell of the zoo: a family under one transform, through the API.

:func:`run_cell` is what both the tests and the docs generator
(``python -m tests.zoo.report``) run: plan, apply with the sample input, the
output error computed here (independently of the manifest), and a save + load
onto a fresh instance. It never hides an exception it does not expect: a clear
refusal (:class:`~tnsurgery.errors.SpecError`, ``MatchError``, ``SurgeryError``)
is recorded with its message; anything else propagates.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tnsurgery
from tnsurgery.compare import float_leaves
from tnsurgery.errors import TnsurgeryError
from tnsurgery.plugins import get_registry
from tnsurgery.tracing import call_model

from .families import Family, save_tokenizer

TRANSFORMS = ("factorize", "tt", "tucker", "cp", "qat")

# The settings each transform runs with: a reduction that shrinks (and so changes
# the outputs), and for factorize also a near-lossless one (energy 0.9999 of a
# power-law spectrum) whose output error must be small.
PARAMS: dict[str, dict[str, Any]] = {
    "factorize": {"param_ratio": 0.25},
    "tt": {"param_ratio": 0.25},
    "tucker": {"param_ratio": 0.25},
    "cp": {"param_ratio": 0.25},
    "qat": {"bits": 8},
}
NEAR_LOSSLESS = {"energy": 0.9999}
NEAR_LOSSLESS_MAX_ERROR = 0.05


def accepted_types(transform: str) -> list[str]:
    """The class names the installed transform accepts (from the registry: what
    ``tnsurgery plugins`` lists), the layer contract left out."""
    types = get_registry().get(transform).module_types
    return [t.__name__ for t in types if t.__name__ != "SurgeryLayer"]


def spec_for(transform: str, params: dict[str, Any] | None = None) -> dict:
    """One rule on every module (``**``) of the types the transform accepts."""
    rule = {
        "match": "**",
        "types": accepted_types(transform),
        "transform": transform,
        "params": PARAMS[transform] if params is None else params,
    }
    return {"version": 1, "rules": [rule]}


def relative(out: Any, ref: Any) -> float:
    """Largest relative error over the float tensors of two outputs (computed here)."""
    worst = 0.0
    refs, outs = float_leaves(ref), float_leaves(out)
    assert [n for n, _ in refs] == [n for n, _ in outs], "the outputs differ in structure"
    for (_, r), (_, o) in zip(refs, outs, strict=True):
        assert r.shape == o.shape
        d = (o.double() - r.double()).norm()
        worst = max(worst, float(d / r.double().norm().clamp_min(1e-30)))
    return worst


def forward(model: nn.Module, x: Any) -> Any:
    with torch.no_grad():
        return call_model(model.eval(), x)


def same_outputs(a: Any, b: Any) -> bool:
    la, lb = float_leaves(a), float_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(la, lb, strict=True)
    )


@dataclass
class Cell:
    family: str
    transform: str
    status: str  # "ok", "refused", "error" (an unexpected exception: a bug)
    targets: int = 0
    replaced: int = 0
    output_error: float | None = None  # computed here, on a second input
    manifest_error: float | None = None  # what the manifest records (sample input)
    near_lossless_error: float | None = None
    loaded_equal: bool | None = None
    not_replaced: Counter = field(default_factory=Counter)  # (type, reason) -> count
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why not replaced
    splits: list[str] = field(default_factory=list)  # modules split before the rule ran
    message: str = ""  # the refusal, or the exception
    error_type: str = ""

    def why_not(self, limit: int = 3) -> list[str]:
        lines = [f"{n}× {t}: {r}" for (t, r), n in self.not_replaced.most_common()]
        return lines[:limit] + ([f"(+{len(lines) - limit} more)"] if len(lines) > limit else [])


def _short(reason: str) -> str:
    return reason.split(" (", 1)[0] if reason.startswith("never called") else reason


def run_cell(family: Family, transform: str, model: nn.Module | None = None,
             save_load: bool = True, near_lossless: bool = True,
             params: dict[str, Any] | None = None) -> Cell:  # fmt: skip
    """Plan, apply, measure, save and load one family under one transform (with its
    :data:`PARAMS`, or ``params``)."""
    model = family.build() if model is None else model
    x, other = family.sample(1), family.sample(2)
    cell = Cell(family.key, transform, "ok")
    spec = spec_for(transform, params)
    try:
        plan = tnsurgery.plan(model, spec, x)
    except TnsurgeryError as exc:
        cell.status, cell.message, cell.error_type = "refused", str(exc), type(exc).__name__
        return cell
    cell.targets = len(plan.targets)
    types = {t.name: t.module_type for t in plan.targets}
    for t in plan.targets:
        if t.status != "replace":
            cell.not_replaced[(t.module_type, _short(t.reason or t.status))] += 1
            cell.reasons[t.name] = t.reason or ""
    try:
        out = tnsurgery.apply(model, spec, x)
    except TnsurgeryError as exc:
        cell.status, cell.message, cell.error_type = "refused", str(exc), type(exc).__name__
        return cell
    manifest = tnsurgery.get_manifest(out)
    # the rule's replacements (a module split first, e.g. an nn.MultiheadAttention into
    # its projections, is recorded too, with no transform)
    done = sorted(r["name"] for r in manifest["replacements"] if r["transform"] == transform)
    cell.replaced = len(done)
    cell.splits = sorted(r["name"] for r in manifest["replacements"] if r["transform"] is None)
    assert done == sorted(t.name for t in plan.replaced()), "apply replaced other targets"
    assert all(name in types for name in done)
    cell.manifest_error = manifest["output_error"]
    ref, got = forward(model, other), forward(out, other)
    cell.output_error = relative(got, ref)
    if near_lossless and transform == "factorize":
        fine = tnsurgery.apply(model, spec_for(transform, NEAR_LOSSLESS), x)
        cell.near_lossless_error = relative(forward(fine, other), ref)
    if save_load:
        with tempfile.TemporaryDirectory() as tmp:
            path = tnsurgery.save(out, Path(tmp) / "m")
            back = tnsurgery.load(path, family.build(seed=7))
            cell.loaded_equal = same_outputs(forward(back, other), got)
    return cell


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ------------------------------------------------------------------ the command line

PLAIN_TORCH_CLASSES = "tests.zoo.vision"  # --allow-class for the pickled vision shapes


@dataclass
class CliCell:
    """``tnsurgery plan``, ``apply``, ``inspect`` on a saved family, and its output loaded."""

    family: str
    transform: str
    default_sample: bool  # no --sample-input: the CLI's default
    plan_exit: int | None = None
    apply_exit: int | None = None
    planned: int | None = None  # replaced, as the plan reports
    replaced: int | None = None  # in the apply's manifest
    output_error: float | None = None  # reported by apply (None: not measured)
    sample_described: str | None = None
    inspect_exit: int | None = None
    inspect_manifest: bool | None = None
    loaded_equal: bool | None = None  # io.load_model(OUT) computes what the API's model does
    reloaded_equal: bool | None = None  # tnsurgery.load(OUT, fresh) too
    message: str = ""  # the first failing command's output

    @property
    def ok(self) -> bool:
        return (
            self.plan_exit == 0
            and self.apply_exit == 0
            and self.inspect_exit == 0
            and bool(self.loaded_equal)
            and bool(self.reloaded_equal)
        )


def write_model(family: Family, model: nn.Module, directory: Path) -> tuple[Path, list[str]]:
    """Save ``model`` the way users hand it to the CLI: a Hugging Face directory
    (``save_pretrained``, with a tokenizer for text families) or a pickled module.
    Returns its path and the flags that read it."""
    if family.hf:
        path = directory / "hf"
        model.save_pretrained(path)
        if family.text:
            save_tokenizer(path)
        return path, []
    path = directory / "model.pt"
    torch.save(model, path)
    return path, ["--allow-class", PLAIN_TORCH_CLASSES]


def _invoke(args: list[str]):
    from click.testing import CliRunner

    from tnsurgery.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: never hidden
    return result


def run_cli(family: Family, directory: Path, transform: str = "factorize",
            default_sample: bool = False) -> CliCell:  # fmt: skip
    """``plan`` / ``apply -o OUT`` / ``inspect OUT`` in-process, then OUT loaded two ways
    (``io.load_model``, and ``tnsurgery.load`` onto a fresh instance) and compared
    with the API's surgery of the same model."""
    from tnsurgery import io

    cell = CliCell(family.key, transform, default_sample)
    model = family.build()
    src, flags = write_model(family, model, directory)
    read_flags = list(flags)
    spec = directory / "spec.json"
    spec.write_text(json.dumps(spec_for(transform)))
    if not default_sample:
        torch.save(family.sample(1), directory / "x.pt")
        flags = [*flags, "--sample-input", directory / "x.pt"]
    res = _invoke(["plan", spec, src, "--json", *flags])
    cell.plan_exit = res.exit_code
    if res.exit_code != 0:
        cell.message = res.output.strip()
        return cell
    cell.planned = json.loads(res.stdout)["totals"]["replaced"]
    out = directory / ("out" if family.hf else "out.pt")
    res = _invoke(["apply", spec, src, "-o", out, "--json", *flags])
    cell.apply_exit = res.exit_code
    if res.exit_code != 0:
        cell.message = res.output.strip()
        return cell
    report = json.loads(res.stdout)
    cell.output_error = report["output_error"]
    cell.sample_described = report.get("sample_input")
    res = _invoke(["inspect", out, "--json", *read_flags])
    cell.inspect_exit = res.exit_code
    if res.exit_code != 0:
        cell.message = res.output.strip()
        return cell
    cell.inspect_manifest = json.loads(res.stdout)["manifest"]
    allow = () if family.hf else (PLAIN_TORCH_CLASSES,)
    loaded = io.load_model(out, allow_classes=allow).model
    records = tnsurgery.get_manifest(loaded)["replacements"]
    cell.replaced = sum(r["transform"] == transform for r in records)
    api = tnsurgery.apply(family.build(), spec_for(transform), family.sample(1))
    x = family.sample(2)
    expected = forward(api, x)
    cell.loaded_equal = same_outputs(forward(loaded, x), expected)
    reloaded = tnsurgery.load(out, family.build(seed=7))
    cell.reloaded_equal = same_outputs(forward(reloaded, x), expected)
    return cell


class Zoo:
    """Each family built once, each cell run once (tests share it per module)."""

    def __init__(self, params: dict[str, dict[str, Any]] | None = None):
        self._models: dict[str, nn.Module] = {}
        self._cells: dict[tuple[str, str], Cell] = {}
        self._params = params or {}  # transform -> params replacing PARAMS

    def model(self, family: Family) -> nn.Module:
        if family.key not in self._models:
            self._models[family.key] = family.build()
        return self._models[family.key]

    def cell(self, family: Family, transform: str) -> Cell:
        key = (family.key, transform)
        if key not in self._cells:
            params = self._params.get(transform)
            self._cells[key] = run_cell(family, transform, self.model(family), params=params)
        return self._cells[key]
