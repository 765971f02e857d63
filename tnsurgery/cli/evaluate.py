"""``tnsurgery eval``: perplexity, cosine or accuracy of a model, side by side with a
baseline (the original) on the same data; writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tnsurgery.cli.app import cli, emit_json, err, out, shown
from tnsurgery.cli.inputs import load_input, model_options
from tnsurgery.errors import UserInputError
from tnsurgery.evaluation import EvalResult, evaluate

TENSOR_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def data_spec(path: str) -> dict[str, Any]:
    """``--data FILE`` as a spec ``data`` dict: a file of tensors (``.pt``, ``.pth``,
    ``.bin``, ``.safetensors``) for the ``tensors`` source, any other file for ``text``."""
    source = "tensors" if Path(path).suffix.lower() in TENSOR_SUFFIXES else "text"
    return {"source": source, "path": path}


def _labels(value: str) -> str | int:
    try:
        return int(value)
    except ValueError:
        return value


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric == "perplexity" else f"{value:.4f}"


@cli.command(name="eval")
@click.argument("model", type=click.Path())
@model_options
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="A text file (one example a line, tokenized with MODEL's tokenizer; for perplexity "
    "read as one token stream) or a .pt / .safetensors file of tensors (a dict with "
    "input_ids, optionally attention_mask and labels; each row as given).",
)
@click.option(
    "--baseline",
    type=click.Path(),
    metavar="ORIGINAL",
    help="The model to compare with (e.g. the original, before surgery), read like MODEL "
    "with the same options; cosine needs it.",
)
@click.option("--baseline-arch", help="pkg.module:factory for --baseline when it differs.")
@click.option(
    "--metric",
    type=click.Choice(["auto", "perplexity", "cosine", "accuracy"]),
    default="auto",
    show_default=True,
    help="auto: perplexity for a causal LM, accuracy when the data holds labels, else cosine.",
)
@click.option(
    "--window",
    type=click.IntRange(min=2),
    help="Perplexity: tokens per forward pass (default: the model's positions, at most 1024).",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    help="Perplexity: tokens the window moves by, less than the window (default: half of it).",
)
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score at most this many tokens.")
@click.option("--samples", type=click.IntRange(min=1), help="Read at most this many examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--labels",
    default="labels",
    show_default=True,
    help="Accuracy: the key of the labels in dict batches, or their index in tuple batches.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(
    model,
    arch,
    trust_pickle,
    allow_class,
    data_path,
    baseline,
    baseline_arch,
    metric,
    window,
    stride,
    max_tokens,
    samples,
    batch_size,
    labels,
    as_json,
):
    """Evaluate MODEL on --data: perplexity (causal LMs, sliding window), mean-pooled
    cosine to --baseline, or accuracy against labels; the baseline's value beside it."""
    if metric == "cosine" and not baseline:
        raise UserInputError("eval: metric 'cosine' compares MODEL with --baseline ORIGINAL")
    if window is not None and stride is not None and stride >= window:
        raise UserInputError(f"eval: --stride {stride} must be less than --window {window}")
    data = data_spec(data_path)
    loaded = load_input(model, arch, trust_pickle, allow_class)
    base = (
        load_input(baseline, baseline_arch or arch, trust_pickle, allow_class) if baseline else None
    )
    with err.status("evaluating"):
        result = evaluate(
            loaded.model, data, baseline=base.model if base else None, metric=metric,
            window=window, stride=stride, samples=samples, max_tokens=max_tokens,
            batch_size=batch_size, labels=_labels(labels),
        )  # fmt: skip
    summary = {
        **result.to_dict(),
        "model_path": str(loaded.path),
        "baseline_path": str(base.path) if base else None,
        "data": data,
    }
    if as_json:
        emit_json(summary)
        return
    _print(result, summary)


def _print(result: EvalResult, summary: dict[str, Any]) -> None:
    metric = result.metric
    t = Table(title=f"Evaluation: {metric}", header_style="bold")
    for col in ("", "model", metric, result.unit):
        t.add_column(col)
    name = "mean cosine to the baseline" if metric == "cosine" else metric
    t.add_row(
        "model", shown(summary["model_path"]), _fmt(metric, result.model), f"{result.count:,}"
    )
    if summary["baseline_path"] is not None:
        value = "1 (the reference)" if metric == "cosine" else _fmt(metric, result.baseline)
        t.add_row("baseline", shown(summary["baseline_path"]), value, f"{result.count:,}")
    out.print(t)
    lines = [f"data: {summary['data']['path']} ({summary['data']['source']})"]
    if metric == "perplexity":
        lines.append(f"window {result.details['window']}, stride {result.details['stride']}")
    if "ratio" in summary:
        lines.append(f"ratio {summary['ratio']:.4f} (model / baseline)")
    if "difference" in summary:
        lines.append(f"difference {summary['difference']:+.4f} (model - baseline)")
    if metric == "cosine":
        lines.append(f"{name}: mean {result.model:.4f}, min {result.details['min']:.4f}")
    for line in lines:
        out.print(shown(line), highlight=False)
