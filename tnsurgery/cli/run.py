"""The commands that operate on a model: ``plan``, ``apply``, ``train``, ``export``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from tnsurgery import io, surgery
from tnsurgery.cli.app import cli, emit_json, err, out, shown
from tnsurgery.cli.inputs import (
    check_spec_writes,
    default_output,
    disk_bytes,
    load_input,
    load_teacher,
    model_options,
    plan_arguments,
    prepare,
    recorded_teacher,
    sample_options,
    source_record,
)
from tnsurgery.cli.render import (
    fmt_err,
    fmt_int,
    model_summary,
    output_error_lines,
    plan_table,
    print_output_error,
    print_passes,
    progress_bar,
)
from tnsurgery.cli.samples import check_sample, resolve_sample
from tnsurgery.cli.speed import build_and_time, speed_table, summary_lines
from tnsurgery.cli.streamed import apply_streamed, streamable
from tnsurgery.errors import UserInputError
from tnsurgery.evaluation import spec_reference
from tnsurgery.manifest import get_manifest, record
from tnsurgery.plan import Plan
from tnsurgery.spec import load_spec
from tnsurgery.speed import parse_tokens
from tnsurgery.training.distributed import (
    FSDP,
    LAUNCH,
    is_main_process,
    leave_process_group,
    under_torchrun,
)


@cli.command(name="plan")
@plan_arguments
@click.option(
    "--tokens",
    metavar="N,N,...",
    help="Also build each replacement (on a copy) and time it against its original at "
    "these token counts, as 'tnsurgery bench' does: the targets that would be slower are "
    "named.",
)
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
    tokens,
):
    """Show what SPEC would do to MODEL, as a table; changes nothing."""
    counts = parse_tokens(tokens) if tokens else None  # a bad value: exit 2 before any work
    s, loaded, x = prepare(
        spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input
    )
    with err.status("planning"):
        p = surgery.plan(loaded.model, s, x.value, allow_empty=allow_empty)
    p.sample_input = x.described
    report = None
    if counts:
        report = build_and_time(s, loaded.model, x.value, counts, "cpu", allow_empty, as_json)
    if as_json:
        emit_json({**p.to_dict(), "speed": report.to_dict()} if report else p.to_dict())
        return
    print_passes(p)
    out.print(plan_table(p))
    out.print(model_summary(p), highlight=False)
    if x.described:
        out.print(shown(f"sample input: {x.described}"), highlight=False)
    if report is not None:
        out.print(speed_table(report))
        for line in summary_lines(report):
            out.print(shown(line), highlight=False)


@cli.command(name="apply")
@plan_arguments
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
@click.option(
    "--device",
    help="Where a Hugging Face checkpoint directory's blocks are surgered and run (cuda, "
    "cuda:1; default the CPU).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Hugging Face checkpoint directory: the plan from its config and its shard "
    "headers alone (no tensor data read), params and bytes before and after; nothing written.",
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
    device,
    dry_run,
):
    """Apply SPEC to MODEL and write the surgered model (same kind as the input) with its
    manifest.json + .safetensors pair.

    A Hugging Face checkpoint directory (config.json and safetensors weights, one file
    or shards) is streamed: read shard by shard and surgered one block at a time (or
    whole, when the spec calibrates, budgets or trains), written as shards with
    model.safetensors.index.json."""
    if streamable(model, arch):
        apply_streamed(
            spec,
            model,
            sample_input,
            no_sample_input,
            as_json,
            allow_empty,
            output,
            teacher,
            teacher_arch,
            device,
            dry_run,
            trust_pickle,
            allow_class,
        )
        return
    if dry_run or device:
        flag = "--dry-run" if dry_run else "--device"
        raise UserInputError(
            f"{flag} works on a Hugging Face checkpoint directory (config.json and "
            f"safetensors weights); {model} is not one (tnsurgery plan shows the plan of any model)"
        )
    main = is_main_process()  # under torchrun (a spec training sharded): rank 0 writes
    as_json = as_json or not main
    s, loaded, x = prepare(
        spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input
    )
    target = Path(output) if output else default_output(loaded)
    master = load_teacher(teacher, teacher_arch or arch, trust_pickle, allow_class)
    protect = [Path(spec), *(master.sources if master else [])]
    targets = io.check_output(loaded, target, protect)  # before the work, not after
    check_spec_writes(s, [*loaded.sources, *protect], targets)
    with progress_bar(as_json) as bar:
        task = bar.add_task("planning", total=None)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, description=message)

        small = surgery.apply(
            loaded.model,
            s,
            x.value,
            allow_empty=allow_empty,
            progress=progress,
            teacher=master.model if master else None,
        )
        bar.update(task, description=f"writing {target}", total=None)
        record(small, "source", source_record(loaded))  # train's teacher
        measured_on(small, x.described)
        leave_process_group()
        if not main:
            return
        written = io.save_like_input(small, loaded, target, protect)
    manifest = surgery.get_manifest(small)
    p = Plan.from_dict(manifest["plan"])
    if as_json:
        emit_json(
            {
                "plan": manifest["plan"],
                "output_error": manifest["output_error"],
                "output_error_name": manifest["output_error_name"],
                "output_errors": p.output_errors,
                "sample_input": p.sample_input,
                "written": [str(w) for w in written],
            }
        )
        return
    print_passes(p)
    out.print(plan_table(p, title="Surgery"))
    out.print(model_summary(p), highlight=False)
    print_output_error(
        manifest["output_error"], manifest["output_error_name"], p.sample_input, p.output_errors
    )
    for w in written:
        out.print(f"wrote {w}", highlight=False)


def measured_on(model, described: str | None) -> None:
    """Record what the output error in ``model``'s manifest was measured on (top level
    and in its plan), when it was measured."""
    manifest = get_manifest(model)
    if manifest is None or manifest.get("output_error") is None or not described:
        return
    record(model, "sample_input", described)
    if isinstance(manifest.get("plan"), dict):
        record(model, "plan", {**manifest["plan"], "sample_input": described})


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
    (label-free) or fine-tune, then write the trained model like 'apply' does. Under
    torchrun every process trains and rank 0 alone prints and writes."""
    s = load_spec(spec)
    if s.training is None:
        raise UserInputError(f"{spec}: the spec has no 'training' section")
    main = is_main_process()
    as_json = as_json or not main  # the other processes print nothing
    if s.training.distributed == FSDP and not under_torchrun():
        err.print(
            "note: distributed 'fsdp' without torchrun: training in this one process "
            f"(to shard over N devices: {LAUNCH})",
            highlight=False,
        )
    loaded = load_input(model, arch, trust_pickle, allow_class)
    if surgery.get_manifest(loaded.model) is None:
        raise UserInputError(f"{model} was not surgered by tnsurgery (no manifest)")
    if s.training.mode == "distill" and not teacher:
        # the model 'apply' surgered, when it is still there unchanged
        original = recorded_teacher(loaded.model, model, spec, teacher_arch or arch)
        if not as_json:
            out.print(f"teacher: {original.path} (the model it was surgered from)", highlight=False)
    else:
        original = load_teacher(teacher, teacher_arch or arch, trust_pickle, allow_class)
    target = Path(output) if output else default_output(loaded, "trained")
    protect = [Path(spec), *(original.sources if original else [])]
    targets = io.check_output(loaded, target, protect)
    check_spec_writes(s, [*loaded.sources, *protect], targets)
    with progress_bar(as_json) as bar:
        task = bar.add_task("training", total=s.training.steps)

        def progress(step: int, total: int, metrics: dict) -> None:
            bar.update(task, completed=step, description=f"loss {metrics['loss']:.4g}")

        result = surgery.train(
            loaded.model, s, original.model if original else None, progress=progress
        )
        leave_process_group()
        if not main:
            return
        evaluation = None
        if s.evaluation is not None and original is not None:  # the trained model, again
            reference = spec_reference(original.model, s.evaluation)
            evaluation = reference.record(loaded.model)
            record(loaded.model, "evaluation", evaluation)
        written = io.save_like_input(loaded.model, loaded, target, protect)
    summary = {**result.to_dict(), "written": [str(w) for w in written]}
    if evaluation is not None:
        summary["evaluation"] = evaluation
    if as_json:
        emit_json(summary)
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
    if evaluation is not None:
        out.print(
            f"{evaluation['metric']}: {evaluation['surgered']:.4g} trained, "
            f"{evaluation['original']:.4g} original",
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
    loaded = load_input(model, arch, trust_pickle, allow_class)
    x = resolve_sample(sample_input, loaded, no_sample_input)
    check_sample(loaded.model, x)
    target = Path(output) if output else default_output(loaded, "exported")
    io.check_output(loaded, target)
    with err.status("exporting"):
        exported = surgery.convert(loaded.model, x.value)
        if x.value is not None:
            record(exported, "sample_input", x.described)
        written = io.save_like_input(exported, loaded, target)
    manifest = surgery.get_manifest(exported)
    sizes = {str(w): disk_bytes(w) for w in written}
    summary = {
        "layers": [
            {k: r[k] for k in ("name", "bytes_before", "bytes_after", "weight_error")}
            for r in manifest["replacements"]
        ],
        "model_bytes_before": manifest["model_bytes_before"],
        "model_bytes_after": manifest["model_bytes_after"],
        "output_error": manifest["output_error"],
        "output_error_name": manifest["output_error_name"],
        "sample_input": x.described if x.value is not None else None,
        "written": sizes,
    }
    if as_json:
        emit_json(summary)
        return
    t = Table(title="Export", header_style="bold")
    for col in ("module", "bytes before", "bytes after", "weight err (vs fake-quant)"):
        t.add_column(col)
    for r in summary["layers"]:
        t.add_row(
            escape(r["name"]),
            fmt_int(r["bytes_before"]),
            fmt_int(r["bytes_after"]),
            fmt_err(r["weight_error"]),
        )
    out.print(t)
    before, after = summary["model_bytes_before"], summary["model_bytes_after"]
    out.print(
        f"model tensors: {fmt_int(before)}B -> {fmt_int(after)}B ({after / before:.1%})",
        highlight=False,
    )
    for line in output_error_lines(
        "output error vs the fake-quant model",
        summary["output_error"],
        summary["output_error_name"],
        summary["sample_input"],
    ):
        out.print(shown(line), highlight=False)
    for w, size in sizes.items():
        out.print(f"wrote {w} ({fmt_int(size)}B)", highlight=False)
