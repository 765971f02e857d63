"""How the commands show things: numbers, the plan table, pass lines, the model
summary and the progress line."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tnsurgery.cli.app import err, out, shown
from tnsurgery.plan import Plan


def fmt_int(n: int | None) -> str:
    """``1.23M``-style counts; ``?`` when unknown."""
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_err(e: float | None) -> str:
    """A relative error for a table; ``-`` when unknown."""
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
            f"{fmt_int(tp.params_before)} -> {fmt_int(tp.params_after)}"
            if tp.status == "replace"
            else fmt_int(tp.params_before),
            f"{fmt_int(tp.flops_before)} -> {fmt_int(tp.flops_after)}"
            if tp.status == "replace"
            else fmt_int(tp.flops_before),
            fmt_err(tp.predicted_error),
            status,
        ]
        if measured:
            row += [fmt_err(tp.weight_error), fmt_err(tp.output_error)]
        t.add_row(*map(shown, row), style=None if tp.status == "replace" else "yellow")
    tot = plan.totals()
    row = [
        "",
        f"total: {tot['replaced']} replaced, {tot['skipped']} skipped, {tot['refused']} refused",
        "",
        "",
        "",
        f"{fmt_int(tot['params_before'])} -> {fmt_int(tot['params_after'])}",
        f"{fmt_int(tot['flops_before'])} -> {fmt_int(tot['flops_after'])}",
        "",
        "",
    ]
    if measured:
        row += ["", ""]
    t.add_row(*row, style="bold")
    return t


def print_passes(plan: Plan) -> None:
    """One line per rule pass: targets, what was left out, how it was traced."""
    for p in plan.passes:
        extra = []
        if p.wrong_type:
            extra.append(f"{p.wrong_type} matched with another type")
        if p.excluded:
            extra.append(f"{p.excluded} excluded")
        more = f" ({', '.join(extra)})" if extra else ""
        line = f"{p.rule}: {p.matched} target(s){more}; traced by {p.trace}"
        out.print(shown(line), highlight=False)


def model_summary(plan: Plan) -> str:
    """Parameters and stored bytes of the whole model, before and after."""
    tot = plan.totals()
    before, after = tot["model_params_before"], tot["model_params_after"]
    ratio = f" ({after / before:.1%})" if before and after is not None else ""
    line = f"model parameters: {fmt_int(before)} -> {fmt_int(after)}{ratio}"
    b0, b1 = tot.get("model_bytes_before"), tot.get("model_bytes_after")
    if b0 and b1 is not None:
        line += f"; tensors stored: {fmt_int(b0)}B -> {fmt_int(b1)}B ({b1 / b0:.1%})"
    return line


def progress_bar(disable: bool) -> Progress:
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


def leaf_name(name: str | None) -> str:
    """An output tensor's name as users know it: ``output.last_hidden_state`` ->
    ``last_hidden_state`` (a whole output stays ``output``)."""
    if not name:
        return "output"
    return name[len("output.") :] if name.startswith("output.") else name


def output_error_lines(
    what: str,
    error: float | None,
    name: str | None,
    measured_on: str | None,
    errors: dict[str, float] | None = None,
) -> list[str]:
    """``what: 0.0312 (relative, last_hidden_state; measured on 16 built-in sentences)``,
    then the error of every other output tensor, when there are others."""
    if error is None:
        return []
    where = f"; measured on {measured_on}" if measured_on else ""
    lines = [f"{what}: {error:.4g} (relative, {leaf_name(name)}{where})"]
    others = {k: v for k, v in (errors or {}).items() if k != name}
    if others:
        shown_others = list(others.items())[:8]
        more = f", and {len(others) - 8} more (--json)" if len(others) > 8 else ""
        lines.append(
            "  other outputs: "
            + ", ".join(f"{leaf_name(k)} {v:.4g}" for k, v in shown_others)
            + more
        )
    return lines


def print_output_error(
    error: float | None,
    name: str | None,
    measured_on: str | None,
    errors: dict[str, float] | None = None,
) -> None:
    """What ``apply`` reports of its output error (:func:`output_error_lines`), or that it
    was not measured."""
    lines = output_error_lines("output error on the sample input", error, name, measured_on, errors)
    for line in lines or ["output error: not measured (no sample input)"]:
        out.print(shown(line), highlight=False)
