"""``tnsurgery apply`` on a Hugging Face checkpoint directory: the streamed path
(:func:`tnsurgery.streaming.apply_checkpoint`), its ``--dry-run`` and its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tnsurgery import io
from tnsurgery.cli.app import emit_json, err, out, shown
from tnsurgery.cli.inputs import check_spec_writes, default_output, load_teacher, source_record
from tnsurgery.cli.render import (
    fmt_int,
    model_summary,
    plan_table,
    print_output_error,
    print_passes,
    progress_bar,
)
from tnsurgery.cli.samples import resolve_sample
from tnsurgery.io.checkpoint import has_checkpoint
from tnsurgery.io.skeleton import empty_model
from tnsurgery.spec import load_spec
from tnsurgery.streaming import apply_checkpoint
from tnsurgery.training.distributed import is_main_process, leave_process_group

__all__ = ["apply_streamed", "streamable"]


def streamable(model: str, arch: str | None) -> bool:
    """Whether MODEL is a Hugging Face checkpoint directory that ``apply`` streams: a
    ``config.json`` and safetensors weights (a single file or shards), not an output
    of tnsurgery (those are read with their manifest)."""
    p = Path(model)
    if arch or not p.is_dir() or not (p / "config.json").is_file() or not has_checkpoint(p):
        return False
    return not io.models.surgered_hf(p)


def apply_streamed(
    spec_path: str,
    model: str,
    sample_input: str | None,
    no_sample_input: bool,
    as_json: bool,
    allow_empty: bool,
    output: str | None,
    teacher: str | None,
    teacher_arch: str | None,
    device: str | None,
    dry_run: bool,
    trust_pickle: bool,
    allow_class: tuple[str, ...],
) -> None:
    """The ``apply`` command on a checkpoint directory (see :func:`streamable`)."""
    spec = load_spec(spec_path)
    main = is_main_process()  # under torchrun (a spec training sharded): rank 0 writes
    as_json = as_json or not main
    source = Path(model)
    skeleton = io.LoadedModel(empty_model(source), "hf", source)
    if dry_run:
        with err.status("reading the shard headers"):
            result = apply_checkpoint(spec, source, None, dry_run=True, allow_empty=allow_empty)
        _report(result.plan, as_json, None, [])
        return
    target = Path(output) if output else default_output(skeleton)
    master = load_teacher(teacher, teacher_arch, trust_pickle, allow_class)
    protect = [Path(spec_path), *(master.sources if master else [])]
    io.check_output(skeleton, target, protect)  # before the work, not after
    check_spec_writes(spec, [source, *protect], [target])
    with err.status("preparing the sample input"):
        x = resolve_sample(sample_input, skeleton, no_sample_input, spec)
    with progress_bar(as_json) as bar:
        task = bar.add_task("reading the checkpoint", total=None)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, description=message)

        result = apply_checkpoint(
            spec,
            source,
            target,
            sample_input=x.value,
            sample_described=x.described,
            device=device,
            allow_empty=allow_empty,
            progress=progress,
            protect=protect,
            teacher=master.model if master else None,
            records={"source": source_record(skeleton)},
        )
        leave_process_group()
    if not main:
        return
    _report(result.plan, as_json, result.manifest, result.written)


def _report(plan: Any, as_json: bool, manifest: dict | None, written: list[Path]) -> None:
    if as_json:
        emit_json(
            {
                "plan": plan.to_dict(),
                "output_error": plan.output_error,
                "output_error_name": plan.output_error_name,
                "output_errors": plan.output_errors,
                "sample_input": plan.sample_input,
                "pipeline": plan.pipeline,
                "streaming": plan.streaming,
                "dry_run": manifest is None,
                "written": [str(w) for w in written],
            }
        )
        return
    print_passes(plan)
    out.print(plan_table(plan, title="Plan (dry run)" if manifest is None else "Surgery"))
    out.print(model_summary(plan), highlight=False)
    s = plan.streaming or {}
    line = f"pipeline: {plan.pipeline} ({s.get('why')})"
    if manifest is not None:
        host, device = s.get("peak_host_bytes"), s.get("peak_device_bytes")
        line += (
            f"; {s.get('seconds')} s, {s.get('shards_read')} shards read, "
            f"{s.get('shards_written')} written; peak memory: host +{fmt_int(host)} bytes"
            + (f", device {fmt_int(device)} bytes" if device is not None else "")
        )
    else:
        line += f"; {s.get('shards_read')} shard headers read, no tensor data; nothing written"
    out.print(shown(line), highlight=False)
    if manifest is not None:
        print_output_error(
            plan.output_error, plan.output_error_name, plan.sample_input, plan.output_errors
        )
    for w in written:
        out.print(f"wrote {w}", highlight=False)
