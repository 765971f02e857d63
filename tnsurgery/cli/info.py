"""The commands that describe: ``validate``, ``schema``, ``plugins``, ``inspect``, ``demo``."""

from __future__ import annotations

import click
import torch
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from tnsurgery import bench, surgery
from tnsurgery.cli.app import cli, emit_json, err, out, shown
from tnsurgery.cli.inputs import load_input, model_options
from tnsurgery.cli.render import fmt_int, plan_table, print_passes
from tnsurgery.decompositions.svd import effective_rank
from tnsurgery.demo import demo_input, demo_model, demo_spec
from tnsurgery.errors import SpecError
from tnsurgery.layer import SurgeryLayer
from tnsurgery.plugins import get_registry
from tnsurgery.spec import json_schema, load_spec


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
        emit_json({"valid": False, "problems": exc.problems})
        raise click.exceptions.Exit(2) from None
    if as_json:
        emit_json({"valid": True, "rules": len(s.rules)})
        return
    n = len(s.rules)
    out.print(f"{spec}: valid ({n} rule{'s' if n != 1 else ''})", highlight=False)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec (installed plugins' params included)."""
    emit_json(json_schema())


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
        emit_json(
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
    """List MODEL's modules with weights: type, shape, params, effective rank.

    Surgered layers are listed as one row each (their parts inside them), with the
    shape of the dense weight they compute with and the parameters they hold."""
    loaded = load_input(model, arch, trust_pickle, allow_class)
    rows = []
    modules, surgered = [], []
    for n, m in loaded.model.named_modules():
        if any(n.startswith(f"{s}.") for s in surgered):
            continue  # (a part of a surgered layer: counted in it)
        if isinstance(m, SurgeryLayer):
            surgered.append(n)
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            modules.append((n, m))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), console=err, transient=True, disable=as_json
    ) as bar:
        task = bar.add_task("effective ranks", total=len(modules))
        for name, m in modules:
            w = m.weight  # (of a surgered layer: the dense weight it computes with)
            layer = isinstance(m, SurgeryLayer)
            row = {
                "name": name,
                "type": type(m).__name__,
                "shape": list(w.shape),
                "params": m.param_count()
                if layer
                else sum(p.numel() for p in m.parameters(recurse=False)),
                "surgered": layer,
                "effective_rank": None,
                "full_rank": None,
            }
            if w.dim() >= 2 and w.is_floating_point():
                with torch.no_grad():
                    row["effective_rank"], row["full_rank"] = effective_rank(w.clone(), energy)
            rows.append(row)
            bar.advance(task)
    total = sum(p.numel() for p in loaded.model.parameters())
    if as_json:
        emit_json(
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
        title=f"{shown(type(loaded.model).__name__)} ({loaded.kind}), {fmt_int(total)} parameters",
        header_style="bold",
    )
    for col in ("module", "type", "weight shape", "params", f"rank @ {energy:.0%} energy"):
        t.add_column(col, overflow="fold")
    for r in rows:
        rank = "-" if r["effective_rank"] is None else f"{r['effective_rank']}/{r['full_rank']}"
        t.add_row(
            shown(r["name"]),
            shown(r["type"]) + (" [dim](surgered)[/dim]" if r["surgered"] else ""),
            "x".join(map(str, r["shape"])),
            fmt_int(r["params"]),
            rank,
        )
    out.print(t)


def _latencies_ms(model, small, x, repeats: int = 15) -> tuple[float, float]:
    """Median forward times of the two models, interleaved round by round (the demo does
    not wait for idle cores, as the benchmarks do)."""
    quiet, bench.QUIET.enabled = bench.QUIET.enabled, False
    try:
        with torch.inference_mode():
            t = bench.interleave({"dense": lambda: model(x), "small": lambda: small(x)}, repeats)
    finally:
        bench.QUIET.enabled = quiet
    return t.ms("dense").median, t.ms("small").median


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
    dense_ms, small_ms = _latencies_ms(model, small, x)
    result = {
        "plan": p.to_dict(),
        "output_error": manifest["output_error"],
        "bytes_before": before,
        "bytes_after": after,
        "latency_ms_before": dense_ms,
        "latency_ms_after": small_ms,
    }
    if as_json:
        emit_json(result)
        return
    out.print("Spec (tnsurgery/data/demo_spec.json):", highlight=False)
    out.print_json(data=spec)
    print_passes(p)
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
