"""The ``tnsurgery`` command line: thin click commands over the library API.

Exit codes: 0 ok, 2 bad input (spec, file, option: a message, never a
traceback), 1 internal error.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tnsurgery import io, surgery
from tnsurgery._version import __version__
from tnsurgery.demo import demo_input, demo_model, demo_spec
from tnsurgery.errors import SpecError, UserInputError
from tnsurgery.manifest import record
from tnsurgery.plan import Plan
from tnsurgery.plugins import get_plugin_manager, get_registry
from tnsurgery.spec import json_schema, load_spec

# Tables are wide: when the output is not a terminal (pipes, CI logs), do not wrap at 80.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class BadInput(click.ClickException):
    """Bad input: message only, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        err.print(f"[bold red]Error:[/] {escape(self.format_message())}", highlight=False)


class Cli(click.Group):
    """Turns tnsurgery's user errors into exit code 2, anything else into exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserInputError as exc:
            raise BadInput(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("TNSURGERY_DEBUG"):
                raise
            err.print(
                f"[bold red]Internal error:[/] {escape(f'{type(exc).__name__}: {exc}')}\n"
                "This is a bug in tnsurgery or a plugin; set TNSURGERY_DEBUG=1 for the traceback.",
                highlight=False,
            )
            ctx.exit(1)


@click.group(cls=Cli)
@click.version_option(__version__, prog_name="tnsurgery")
def cli() -> None:
    """Declarative surgery on trained PyTorch models."""


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def model_options(f):
    """--arch / --trust-pickle / --allow-class: every command that reads a model has them."""

    @click.option(
        "--arch", help="pkg.module:factory building the architecture (state dicts, .safetensors)."
    )
    @click.option(
        "--trust-pickle",
        is_flag=True,
        help="Unpickle the model file with no restriction (only for files you trust).",
    )
    @click.option(
        "--allow-class",
        "allow_class",
        multiple=True,
        metavar="pkg.Class",
        help="Allow this class (or package prefix) when unpickling; repeatable.",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def sample_options(f):
    @click.option(
        "--sample-input",
        "sample_input",
        metavar="SPEC",
        help="A .pt file of tensors (tensor, tuple or dict), a shape like 8x3x32x32 "
        "(random floats), int:2x16:VOCAB (random ids), or 'auto' (Hugging Face models; "
        "their default). Used to trace, count FLOPs and measure the output error.",
    )
    @click.option("--no-sample-input", is_flag=True, help="Do not use any sample input.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _load(model_path: str, arch, trust_pickle, allow_class) -> io.LoadedModel:
    with err.status(f"loading {model_path}"):
        return io.load_model(
            model_path, arch=arch, trust_pickle=trust_pickle, allow_classes=allow_class
        )


def _load_teacher(path: str | None, arch, trust_pickle, allow_class) -> torch.nn.Module | None:
    """The model ``--teacher`` names (``arch``: ``--teacher-arch``, else ``--arch``)."""
    return _load(path, arch, trust_pickle, allow_class).model if path else None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise UserInputError(
            f"--sample-input: bad shape {text!r} (expected e.g. 8x3x32x32)"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise UserInputError(f"--sample-input: bad shape {text!r}")
    return dims


def resolve_sample_input(
    text: str | None, loaded: io.LoadedModel | None, disabled: bool = False
) -> Any:
    """Turn ``--sample-input`` into tensors (see the option's help)."""
    if disabled:
        return None
    model = loaded.model if loaded else None
    config = getattr(model, "config", None)
    if text is None:
        text = "auto" if config is not None and hasattr(config, "vocab_size") else None
    if text is None:
        return None
    g = torch.Generator().manual_seed(0)
    if text == "auto":
        if config is None or not hasattr(config, "vocab_size"):
            raise UserInputError("--sample-input auto works for Hugging Face text models only")
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if text.startswith("int:"):
        parts = text.split(":")
        if len(parts) != 3:
            raise UserInputError("--sample-input int:SHAPE:HIGH, e.g. int:2x16:30522")
        try:
            high = int(parts[2])
        except ValueError:
            raise UserInputError(f"--sample-input: bad upper bound {parts[2]!r}") from None
        return torch.randint(0, high, _parse_shape(parts[1]), generator=g)
    path = Path(text)
    if path.exists():
        if path.suffix == ".safetensors":
            state, _ = io._read_safetensors(path)
            return state
        obj = io.torch_load_safely(path)
        if isinstance(obj, (torch.Tensor, tuple, list, dict)):
            return tuple(obj) if isinstance(obj, list) else obj
        raise UserInputError(f"--sample-input {path}: expected tensors, got {type(obj).__name__}")
    if any(c.isdigit() for c in text) and set(text.lower()) <= set("0123456789x"):
        shape = _parse_shape(text)
        ref = next(iter(model.parameters()), None) if model is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        return torch.randn(shape, generator=g).to(dtype)
    raise UserInputError(f"--sample-input {text!r}: no such file, and not a shape like 8x3x32x32")


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.2e}" if e < 1e-3 else f"{e:.4f}"


def plan_table(plan: Plan, title: str = "Plan") -> Table:
    """The plan as a rich table, totals in the last row."""
    t = Table(title=title, show_lines=False, header_style="bold")
    for col in (
        "#",
        "module",
        "type",
        "transform",
        "resolved",
        "params",
        "FLOPs",
        "pred. err",
        "status",
    ):
        t.add_column(col, overflow="fold")
    measured = plan.applied
    if measured:
        t.add_column("weight err")
        t.add_column("layer out err")
    for tp in plan.targets:
        resolved = ", ".join(f"{k}={v}" for k, v in tp.resolved.items())
        status = tp.status if not tp.reason else f"{tp.status}: {tp.reason}"
        row = [
            str(tp.rule_index),
            tp.name,
            tp.module_type,
            tp.transform,
            resolved,
            f"{_fmt_int(tp.params_before)} -> {_fmt_int(tp.params_after)}"
            if tp.status == "replace"
            else _fmt_int(tp.params_before),
            f"{_fmt_int(tp.flops_before)} -> {_fmt_int(tp.flops_after)}"
            if tp.status == "replace"
            else _fmt_int(tp.flops_before),
            _fmt_err(tp.predicted_error),
            status,
        ]
        if measured:
            row += [_fmt_err(tp.weight_error), _fmt_err(tp.output_error)]
        t.add_row(*map(escape, row), style=None if tp.status == "replace" else "yellow")
    tot = plan.totals()
    row = [
        "",
        f"total: {tot['replaced']} replaced, {tot['skipped']} skipped, {tot['refused']} refused",
        "",
        "",
        "",
        f"{_fmt_int(tot['params_before'])} -> {_fmt_int(tot['params_after'])}",
        f"{_fmt_int(tot['flops_before'])} -> {_fmt_int(tot['flops_after'])}",
        "",
        "",
    ]
    if measured:
        row += ["", ""]
    t.add_row(*row, style="bold")
    return t


def _print_passes(plan: Plan) -> None:
    for p in plan.passes:
        extra = []
        if p.wrong_type:
            extra.append(f"{p.wrong_type} matched with another type")
        if p.excluded:
            extra.append(f"{p.excluded} excluded")
        more = f" ({', '.join(extra)})" if extra else ""
        out.print(f"{p.rule}: {p.matched} target(s){more}; traced by {p.trace}", highlight=False)


def _model_summary(plan: Plan) -> str:
    tot = plan.totals()
    before, after = tot["model_params_before"], tot["model_params_after"]
    ratio = f" ({after / before:.1%})" if before and after is not None else ""
    line = f"model parameters: {_fmt_int(before)} -> {_fmt_int(after)}{ratio}"
    b0, b1 = tot.get("model_bytes_before"), tot.get("model_bytes_after")
    if b0 and b1 is not None:
        line += f"; tensors stored: {_fmt_int(b0)}B -> {_fmt_int(b1)}B ({b1 / b0:.1%})"
    return line


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(spec: str, as_json: bool) -> None:
    """Check a spec file: structure, patterns, transform names and params."""
    try:
        s = load_spec(spec)
    except SpecError as exc:
        if not as_json:
            raise
        _emit_json({"valid": False, "problems": exc.problems})
        raise click.exceptions.Exit(2) from None
    if as_json:
        _emit_json({"valid": True, "rules": len(s.rules)})
        return
    n = len(s.rules)
    out.print(f"{spec}: valid ({n} rule{'s' if n != 1 else ''})", highlight=False)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec (installed plugins' params included)."""
    _emit_json(json_schema())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List the installed transforms (name, origin, accepted types, params) and data
    sources (for calibration and training data)."""
    reg = get_registry()
    rows = []
    for name, t in sorted(reg.transforms.items()):
        rows.append(
            {
                "name": name,
                "origin": reg.origins[name],
                "types": [c.__name__ for c in t.module_types],
                "params": list(t.params_model.model_fields),
                "description": t.description,
            }
        )
    failures = [f.__dict__ for f in reg.failures]
    sources = [
        {
            "name": name,
            "origin": reg.data_origins[name],
            "params": list(src.params_model.model_fields),
            "description": src.description,
        }
        for name, src in sorted(reg.data_sources.items())
    ]
    trainers = [
        {"name": n, "origin": reg.trainer_origins[n], "description": t.description}
        for n, t in sorted(reg.trainers.items())
    ]
    if as_json:
        _emit_json(
            {"transforms": rows, "data_sources": sources, "trainers": trainers, "failed": failures}
        )
        return
    table = Table(title="Transforms", header_style="bold")
    for col in ("name", "origin", "types", "params", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], r["origin"], ", ".join(r["types"]), ", ".join(r["params"]), r["description"]
        )
    out.print(table)
    table = Table(title="Data sources", header_style="bold")
    for col in ("source", "origin", "params", "description"):
        table.add_column(col, overflow="fold")
    for r in sources:
        table.add_row(r["name"], r["origin"], ", ".join(r["params"]), r["description"])
    out.print(table)
    table = Table(title="Trainers", header_style="bold")
    for col in ("trainer", "origin", "description"):
        table.add_column(col, overflow="fold")
    for r in trainers:
        table.add_row(r["name"], r["origin"], r["description"])
    out.print(table)
    for f in failures:
        line = f"{f['name']} ({f['origin']}): {f['error']}"
        out.print(f"[red]failed to load[/] {escape(line)}", highlight=False)


def _common_plan_args(f):
    f = click.option(
        "--allow-empty", is_flag=True, help="Do not fail on rules that match nothing."
    )(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = sample_options(f)
    f = model_options(f)
    f = click.argument("model", type=click.Path())(f)
    f = click.argument("spec", type=click.Path(dir_okay=False))(f)
    return f


def _prepare(spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input):
    """Spec first (cheap, and its errors matter most), then the model and the sample input."""
    s = load_spec(spec)
    loaded = _load(model, arch, trust_pickle, allow_class)
    return s, loaded, resolve_sample_input(sample_input, loaded, no_sample_input)


@cli.command(name="plan")
@_common_plan_args
def plan_cmd(
    spec,
    model,
    arch,
    trust_pickle,
    allow_class,
    sample_input,
    no_sample_input,
    as_json,
    allow_empty,
):
    """Show what SPEC would do to MODEL, as a table; changes nothing."""
    s, loaded, x = _prepare(
        spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input
    )
    with err.status("planning"):
        p = surgery.plan(loaded.model, s, x, allow_empty=allow_empty)
    if as_json:
        _emit_json(p.to_dict())
        return
    _print_passes(p)
    out.print(plan_table(p))
    out.print(_model_summary(p), highlight=False)


def _progress_bar(disable: bool) -> Progress:
    """The status line of long commands (on stderr, gone when done)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


@cli.command(name="apply")
@_common_plan_args
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Where to write (default: beside the input, '.surgered').",
)
@click.option(
    "--teacher",
    type=click.Path(),
    help="The teacher of the spec's 'training' (default: MODEL itself, before surgery); "
    "needed by order 'distill_then_compress' with mode 'distill'. Read like MODEL.",
)
@click.option(
    "--teacher-arch", help="pkg.module:factory for --teacher when it is another architecture."
)
def apply_cmd(
    spec,
    model,
    arch,
    trust_pickle,
    allow_class,
    sample_input,
    no_sample_input,
    as_json,
    allow_empty,
    output,
    teacher,
    teacher_arch,
):
    """Apply SPEC to MODEL and write the surgered model (same kind as the input) with its
    manifest.json + .safetensors pair."""
    s, loaded, x = _prepare(
        spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input
    )
    target = Path(output) if output else io.default_output(loaded)
    master = _load_teacher(teacher, teacher_arch or arch, trust_pickle, allow_class)
    with _progress_bar(as_json) as bar:
        task = bar.add_task("planning", total=None)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, description=message)

        small = surgery.apply(
            loaded.model, s, x, allow_empty=allow_empty, progress=progress, teacher=master
        )
        bar.update(task, description=f"writing {target}", total=None)
        record(small, "source", io.source_record(loaded))  # train's teacher
        written = io.save_like_input(small, loaded, target)
    manifest = surgery.get_manifest(small)
    p = Plan.from_dict(manifest["plan"])
    if as_json:
        _emit_json(
            {
                "plan": manifest["plan"],
                "output_error": manifest["output_error"],
                "output_error_name": manifest["output_error_name"],
                "written": [str(w) for w in written],
            }
        )
        return
    _print_passes(p)
    out.print(plan_table(p, title="Surgery"))
    out.print(_model_summary(p), highlight=False)
    if manifest["output_error"] is not None:
        out.print(
            f"output error on the sample input: {manifest['output_error']:.4g} "
            f"(relative, {manifest['output_error_name']})",
            highlight=False,
        )
    else:
        out.print("output error: not measured (no sample input)", highlight=False)
    for w in written:
        out.print(f"wrote {w}", highlight=False)


@cli.command(name="train")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("model", type=click.Path())
@model_options
@click.option(
    "--teacher",
    type=click.Path(),
    help="The original model (before surgery): the teacher of 'distill'. Read like MODEL.",
)
@click.option(
    "--teacher-arch", help="pkg.module:factory for --teacher when it is another architecture."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Where to write (default: beside the input, '.trained').",
)
def train_cmd(spec, model, arch, trust_pickle, allow_class, teacher, teacher_arch, as_json, output):
    """Run SPEC's 'training' section on MODEL, a surgered model: distill from --teacher
    (label-free) or fine-tune, then write the trained model like 'apply' does."""
    s = load_spec(spec)
    if s.training is None:
        raise UserInputError(f"{spec}: the spec has no 'training' section")
    loaded = _load(model, arch, trust_pickle, allow_class)
    if surgery.get_manifest(loaded.model) is None:
        raise UserInputError(f"{model} was not surgered by tnsurgery (no manifest)")
    if s.training.mode == "distill" and not teacher:
        # the model 'apply' surgered, when it is still there unchanged
        src, why = io.recorded_source(loaded.model)
        if why is not None:
            raise UserInputError(
                "mode 'distill' needs the original model: give --teacher ORIGINAL_MODEL"
                + (f" ({why})" if src is not None else "")
            )
        teacher, teacher_arch = src["path"], teacher_arch or src.get("arch")
        if not as_json:
            out.print(f"teacher: {teacher} (the model it was surgered from)", highlight=False)
    original = _load_teacher(teacher, teacher_arch or arch, trust_pickle, allow_class)
    target = Path(output) if output else io.default_output(loaded, "trained")
    with _progress_bar(as_json) as bar:
        task = bar.add_task("training", total=s.training.steps)

        def progress(step: int, total: int, metrics: dict) -> None:
            bar.update(task, completed=step, description=f"loss {metrics['loss']:.4g}")

        result = surgery.train(loaded.model, s, original, progress=progress)
        written = io.save_like_input(loaded.model, loaded, target)
    summary = {**result.to_dict(), "written": [str(w) for w in written]}
    if as_json:
        _emit_json(summary)
        return
    out.print(
        f"trained {result.steps} steps in {result.seconds:.1f} s: loss "
        f"{summary['first_loss']:.4g} -> {summary['last_loss']:.4g}",
        highlight=False,
    )
    for e in result.evals:
        out.print(
            f"  step {e['step']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in e.items() if k != "step"),
            highlight=False,
        )
    for w in written:
        out.print(f"wrote {w}", highlight=False)


@cli.command(name="export")
@click.argument("model", type=click.Path())
@model_options
@sample_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Where to write (default: beside the input, '.exported').",
)
def export_cmd(
    model, arch, trust_pickle, allow_class, sample_input, no_sample_input, as_json, output
):
    """Store the integer weights of MODEL's QAT layers (a model surgered with a 'qat'
    rule): packed integers, scales and zero points, dequantized on the fly. Writes the
    same kind of file as the input, with its manifest.json + .safetensors pair."""
    loaded = _load(model, arch, trust_pickle, allow_class)
    x = resolve_sample_input(sample_input, loaded, no_sample_input)
    target = Path(output) if output else io.default_output(loaded, "exported")
    with err.status("exporting"):
        exported = surgery.convert(loaded.model, x)
        written = io.save_like_input(exported, loaded, target)
    manifest = surgery.get_manifest(exported)
    sizes = {str(w): _disk_bytes(w) for w in written}
    summary = {
        "layers": [
            {k: r[k] for k in ("name", "bytes_before", "bytes_after", "weight_error")}
            for r in manifest["replacements"]
        ],
        "model_bytes_before": manifest["model_bytes_before"],
        "model_bytes_after": manifest["model_bytes_after"],
        "output_error": manifest["output_error"],
        "output_error_name": manifest["output_error_name"],
        "written": sizes,
    }
    if as_json:
        _emit_json(summary)
        return
    t = Table(title="Export", header_style="bold")
    for col in ("module", "bytes before", "bytes after", "weight err (vs fake-quant)"):
        t.add_column(col)
    for r in summary["layers"]:
        t.add_row(
            escape(r["name"]),
            _fmt_int(r["bytes_before"]),
            _fmt_int(r["bytes_after"]),
            _fmt_err(r["weight_error"]),
        )
    out.print(t)
    before, after = summary["model_bytes_before"], summary["model_bytes_after"]
    out.print(
        f"model tensors: {_fmt_int(before)}B -> {_fmt_int(after)}B ({after / before:.1%})",
        highlight=False,
    )
    if summary["output_error"] is not None:
        out.print(
            f"output error vs the fake-quant model: {summary['output_error']:.3g} "
            f"(relative, {summary['output_error_name']})",
            highlight=False,
        )
    for w, size in sizes.items():
        out.print(f"wrote {w} ({_fmt_int(size)}B)", highlight=False)


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def effective_rank(weight: torch.Tensor, energy: float = 0.99) -> tuple[int, int]:
    """(rank keeping ``energy`` of the squared singular values, full rank) of a weight."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    s2 = torch.linalg.svdvals(w).square()
    total = float(s2.sum())
    if total == 0:
        return 0, min(w.shape)
    kept = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-9))) + 1, min(w.shape)


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--energy",
    default=0.99,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Energy for the effective rank.",
)
def inspect(model, arch, trust_pickle, allow_class, as_json, energy):
    """List MODEL's modules with weights: type, shape, params, effective rank."""
    loaded = _load(model, arch, trust_pickle, allow_class)
    rows = []
    modules = [
        (n, m)
        for n, m in loaded.model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), console=err, transient=True, disable=as_json
    ) as bar:
        task = bar.add_task("effective ranks", total=len(modules))
        for name, m in modules:
            w = m.weight
            row = {
                "name": name,
                "type": type(m).__name__,
                "shape": list(w.shape),
                "params": sum(p.numel() for p in m.parameters(recurse=False)),
                "effective_rank": None,
                "full_rank": None,
            }
            if w.dim() >= 2 and w.is_floating_point():
                row["effective_rank"], row["full_rank"] = effective_rank(w, energy)
            rows.append(row)
            bar.advance(task)
    total = sum(p.numel() for p in loaded.model.parameters())
    if as_json:
        _emit_json(
            {
                "model": type(loaded.model).__name__,
                "kind": loaded.kind,
                "params": total,
                "modules": rows,
                "manifest": surgery.get_manifest(loaded.model) is not None,
            }
        )
        return
    t = Table(
        title=f"{type(loaded.model).__name__} ({loaded.kind}), {_fmt_int(total)} parameters",
        header_style="bold",
    )
    for col in ("module", "type", "weight shape", "params", f"rank @ {energy:.0%} energy"):
        t.add_column(col, overflow="fold")
    for r in rows:
        rank = "-" if r["effective_rank"] is None else f"{r['effective_rank']}/{r['full_rank']}"
        t.add_row(r["name"], r["type"], "x".join(map(str, r["shape"])), _fmt_int(r["params"]), rank)
    out.print(t)


def _median_ms(fn, x, repeats: int = 15) -> float:
    times = []
    with torch.inference_mode():
        fn(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo(as_json: bool) -> None:
    """Surgery of a small built-in model with the shipped spec: plan, error, size, speed."""
    model, spec, x = demo_model(), demo_spec(), demo_input()
    p = surgery.plan(model, spec, x)
    small = surgery.apply(model, spec, x)
    manifest = surgery.get_manifest(small)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    after = sum(t.numel() * t.element_size() for t in small.state_dict().values())
    dense_ms, small_ms = _median_ms(model, x), _median_ms(small, x)
    result = {
        "plan": p.to_dict(),
        "output_error": manifest["output_error"],
        "bytes_before": before,
        "bytes_after": after,
        "latency_ms_before": dense_ms,
        "latency_ms_after": small_ms,
    }
    if as_json:
        _emit_json(result)
        return
    out.print("Spec (tnsurgery/data/demo_spec.json):", highlight=False)
    out.print_json(data=spec)
    _print_passes(p)
    out.print(plan_table(p))
    out.print(
        f"measured output error: {manifest['output_error']:.4f} "
        f"(relative Frobenius, batch of {x.shape[0]})",
        highlight=False,
    )
    out.print(
        f"size: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({after / before:.1%})",
        highlight=False,
    )
    out.print(
        f"speed (median forward, batch {x.shape[0]}, {torch.get_num_threads()} threads): "
        f"{dense_ms:.2f} ms -> {small_ms:.2f} ms ({dense_ms / small_ms:.2f}x faster)",
        highlight=False,
    )


def main() -> None:
    """Entry point of the ``tnsurgery`` script."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_plugin_manager()
    for f in getattr(pm, "_tnsurgery_failures", []):
        line = f"plugin '{f.name}' ({f.origin}) failed to load: {f.error}"
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    pm.hook.register_commands(cli=cli)
    cli.main(prog_name="tnsurgery")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
