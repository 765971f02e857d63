"""``tnsurgery bench``: each replacement a spec makes, timed against the layer it
replaces at the token counts a model serves, next to its FLOP ratio."""

from __future__ import annotations

from typing import Any

import click
import torch
from rich.table import Table
from torch import nn

from tnsurgery import speed, surgery
from tnsurgery.cli.app import cli, emit_json, err, out, shown
from tnsurgery.cli.inputs import plan_arguments, prepare
from tnsurgery.cli.render import progress_bar
from tnsurgery.spec import Spec

MAX_NAMES = 12  # target names listed on a line; the rest are in --json


@cli.command(name="bench")
@plan_arguments
@click.option(
    "--tokens",
    default=",".join(map(str, speed.DEFAULT_TOKENS)),
    show_default=True,
    metavar="N,N,...",
    help="Token counts to time each layer at (rows of its input): decode is 1 to 16, "
    f"prefill hundreds to thousands; each from 1 to {speed.MAX_TOKENS:,}.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where to time (layers are moved there one pair at a time, in the model's dtype).",
)
def bench_cmd(
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
    device,
):
    """Time every replacement SPEC makes in MODEL against the layer it replaces, at each
    token count; changes nothing.

    Low rank is faster only where a layer is compute-bound: thin factors can be
    slower than the dense layer at decode sizes (1 to 16 tokens). The table gives,
    per target, the FLOP ratio and the measured time ratio (replacement / original)
    at each token count, the slower ones marked; the last lines name the targets
    slower at every or some token counts: exclude them in the spec, or give
    factorize a rank_multiple (8/16/32/64). The layers are built as `apply` builds
    them (calibration, budget and refit included; a training section is not run).

    --json prints: device, device_name, threads, torch, tokens; targets (per
    target: name, module_type, replacement, transform, resolved, dtype,
    flop_ratio, plan_flop_ratio, timed, reason, same_as, and timings: per token
    count tokens, input_shape, original_s, replacement_s, ratio, flops_before,
    flops_after, flop_ratio, slower, repeats, calls_per_repeat); totals (per token
    count: tokens, targets, original_s, replacement_s, ratio, flop_ratio, slower);
    slower (every, some: target names). Times are seconds per call (medians).
    """
    counts = speed.parse_tokens(tokens)
    dev = speed.resolve_device(device)  # before the model is read: a refusal is quick
    s, loaded, x = prepare(
        spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input
    )
    report = build_and_time(s, loaded.model, x.value, counts, dev, allow_empty, as_json)
    if as_json:
        emit_json(report.to_dict())
        return
    out.print(speed_table(report))
    for line in summary_lines(report):
        out.print(shown(line), highlight=False)


def build_and_time(
    spec: Spec,
    model: nn.Module,
    sample_input: Any,
    tokens: list[int],
    device: str | torch.device = "cpu",
    allow_empty: bool = False,
    quiet: bool = False,
) -> speed.SpeedReport:
    """The replacements ``spec`` makes in ``model``, built by ``surgery.apply`` (on a
    copy; a training section is not run: the layers are timed as built) and timed
    against their originals at ``tokens``, with a progress line unless ``quiet``."""
    if spec.training is not None:
        spec = spec.model_copy(update={"training": None})
        if not quiet:
            err.print(
                "note: the spec's training section is not run: the layers are timed as "
                "built (a progressive_rank would cut their ranks further)",
                highlight=False,
            )
    with progress_bar(quiet) as bar:
        task = bar.add_task("building the replacements", total=None)
        surgered = surgery.apply(model, spec, sample_input, allow_empty=allow_empty)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"timing {name}")

        return speed.measure(model, surgered, tokens, device=device, progress=progress)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def speed_table(report: speed.SpeedReport) -> Table:
    """The report as a rich table: per target its FLOP ratio and its time ratio at each
    token count (slower ones in red), totals in the last row."""
    t = Table(
        title="Speed (replacement time / original time)", show_lines=False, header_style="bold"
    )
    for col in ("module", "transform", "resolved", "FLOP ratio"):
        t.add_column(col, overflow="fold")
    for n in report.tokens:
        t.add_column(f"{n} tok", justify="right")
    t.add_column("note", overflow="fold")
    for ts in report.targets:
        at = {tm.tokens: tm for tm in ts.timings}
        cells = []
        for n in report.tokens:
            tm = at.get(n)
            cells.append(
                "-"
                if tm is None
                else f"[red]{tm.ratio:.3f} slower[/]"
                if tm.slower
                else f"{tm.ratio:.3f}"
            )
        note = ts.reason and f"not timed: {ts.reason}"
        if ts.same_as:
            note = f"timings of {ts.same_as} (same shapes)"
        other = [tm for tm in ts.timings if tm.tokens is None]  # on the recorded shape
        if other:
            shape = "x".join(map(str, other[0].input_shape))
            note = f"timed once, on the recorded input {shape}: {other[0].ratio:.3f}"
        resolved = ", ".join(f"{k}={v}" for k, v in ts.resolved.items() if k != "method")
        row = [shown(ts.name), shown("+".join(ts.transforms)), shown(resolved)]
        row += [_ratio(ts.flop_ratio), *cells, shown(note or "")]
        t.add_row(*row, style=None if ts.timed else "yellow")
    totals = {row["tokens"]: row for row in report.totals()}
    flops = next((r["flop_ratio"] for r in totals.values() if r["flop_ratio"] is not None), None)
    cells = []
    for n in report.tokens:
        row = totals.get(n)
        mark = " slower" if row is not None and row["slower"] else ""
        cells.append("-" if row is None else f"{row['ratio']:.3f}{mark}")
    t.add_row(
        f"total: {len(report.targets)} target(s)", "", "", _ratio(flops), *cells, "", style="bold"
    )
    return t


def _names(names: list[str]) -> str:
    more = f", and {len(names) - MAX_NAMES} more (--json)" if len(names) > MAX_NAMES else ""
    return ", ".join(names[:MAX_NAMES]) + more


def summary_lines(report: speed.SpeedReport) -> list[str]:
    """The device, the summed times per token count, and the targets that got slower,
    with what to do about them."""
    lines = [
        f"timed on {report.device_name} ({report.device}, {report.threads} threads); "
        "medians of interleaved rounds, inference mode"
    ]
    for row in report.totals():
        lines.append(
            f"{row['tokens']} token(s): {_ms(row['original_s'])} -> "
            f"{_ms(row['replacement_s'])} over {row['targets']} layer(s) ({row['ratio']:.3f}x)"
        )
    slower = report.slower()
    if slower["every"]:
        lines.append(f"slower at every token count: {_names(slower['every'])}")
    if slower["some"]:
        named = []
        for ts in report.targets:
            if ts.name in slower["some"]:
                at = ", ".join(str(tm.tokens) for tm in ts.timings if tm.slower)
                named.append(f"{ts.name} ({at})")
        lines.append(f"slower at some token counts: {_names(named)}")
    if slower["every"] or slower["some"]:
        lines.append(f"to keep those layers fast: {speed.HINT}")
    elif report.targets:
        lines.append("no replacement is slower than its original at these token counts")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"
