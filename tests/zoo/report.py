"""Write docs/models.md from a run of the zoo: ``python -m tests.zoo.report``.

It runs the same family definitions and the same cells as ``tests/zoo`` (the API for
each family × transform, the CLI's factorize with a sample input file and with the
CLI's default sample input) and writes the table, with the measured output errors,
the reason of every refusal and the known bugs.

``python -m tests.zoo.report --torchvision`` (in a venv where torchvision imports:
see docs/models.md) runs the real torchvision models instead and writes
``tests/zoo/torchvision_results.json``, which the default run renders as a section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .bugs import API as API_BUGS
from .bugs import CLI_DEFAULT_SAMPLE
from .families import FAMILIES, Family
from .runner import NEAR_LOSSLESS, PARAMS, TRANSFORMS, Cell, Zoo, accepted_types, run_cli

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"
TORCHVISION_RESULTS = Path(__file__).with_name("torchvision_results.json")
COMMAND = "python -m tests.zoo.report"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "torchvision", "tnsurgery"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def _machine() -> str:
    import os

    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, CPU only"


def _err(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _first_sentence(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    line = re.sub(r"^rule \d+ \(match '[^']*'\) ", "", line.split("; matched only", 1)[0])
    return line if len(line) <= 90 else line[:87] + "..."


def _cell_dict(cell: Cell | None, error: str | None = None) -> dict:
    if cell is None:
        return {"status": "error", "message": error or ""}
    return {
        "status": cell.status,
        "targets": cell.targets,
        "replaced": cell.replaced,
        "output_error": cell.output_error,
        "manifest_error": cell.manifest_error,
        "near_lossless_error": cell.near_lossless_error,
        "loaded_equal": cell.loaded_equal,
        "not_replaced": [[t, r, n] for (t, r), n in cell.not_replaced.most_common()],
        "splits": cell.splits,
        "message": cell.message,
        "error_type": cell.error_type,
    }


def run_api(families: list[Family], zoo: Zoo, log=print) -> dict[str, dict[str, dict]]:
    """Every cell; an unexpected exception is recorded as ``error`` (a bug), not raised."""
    results: dict[str, dict[str, dict]] = {}
    for family in families:
        results[family.key] = {}
        for transform in TRANSFORMS:
            start = time.perf_counter()
            try:
                entry = _cell_dict(zoo.cell(family, transform))
            except Exception as exc:  # a traceback: the doc says so
                tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
                entry = _cell_dict(None, tb)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            results[family.key][transform] = entry
            log(f"{family.key:18s} {transform:9s} {entry['status']:8s} {entry['seconds']}s")
    return results


def run_clis(families: list[Family], log=print) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    for family in families:
        results[family.key] = {}
        modes = [("file", False)] + ([("default", True)] if family.hf else [])
        for mode, default in modes:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    c = run_cli(family, Path(tmp), default_sample=default)
                    entry = {
                        "ok": c.ok,
                        "output_error": c.output_error,
                        "replaced": c.replaced,
                        "sample": c.sample_described,
                        "message": c.message,
                    }
                except Exception as exc:
                    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
                    entry = {"ok": False, "message": tb, "output_error": None}
            results[family.key][mode] = entry
            log(f"{family.key:18s} cli/{mode:7s} {'ok' if entry['ok'] else 'FAIL'}")
    return results


# ----------------------------------------------------------------------- rendering


def _api_text(e: dict, expected_refusal: str | None, bug: str | None = None) -> str:
    if bug is not None:
        return _api_text(e, expected_refusal) + " · xfail: bug (see below)"
    if e["status"] == "ok":
        text = f"ok {e['replaced']}/{e['targets']} · {_err(e['output_error'])}"
        if not e.get("loaded_equal"):
            text += " · **load differs**"
        if expected_refusal is not None:
            text += " (refusal expected: zoo out of date)"
        return text
    if e["status"] == "refused":
        mark = "" if expected_refusal is not None and expected_refusal in e["message"] else " ⚠"
        return f"refused{mark}: {_first_sentence(e['message'])}"
    return f"**error** (bug): {e['message'][:120]}"


def _cli_text(family: Family, e: dict | None, default: bool = False) -> str:
    if e is None:
        return "n/a"
    bug = CLI_DEFAULT_SAMPLE.get(family.key) if default else None
    if e["ok"]:
        text = f"ok · {_err(e['output_error'])}" if e["output_error"] is not None else "ok · none"
        return text + (" (bug marker stale)" if bug else "")
    if bug:
        return "xfail: bug (see below)"
    return f"**fails**: {_first_sentence(e['message'])}"


def _normal(reason: str) -> str:
    """A reason without the sizes that differ from module to module."""
    reason = re.sub(
        r"groups=\d+: only groups=1 convolutions are .*",
        "depthwise (groups > 1): only groups=1 convolutions are decomposed",
        reason,
    )
    return re.sub(r"would not shrink: .*", "would not shrink at this rank", reason)[:160]


def _left_as_is(key: str, rows: dict) -> str | None:
    seen: dict[tuple[str, str], dict[str, int]] = {}
    for transform in TRANSFORMS:
        for t, reason, n in rows[transform].get("not_replaced", []):
            kept = seen.setdefault((t, _normal(reason)), {})
            kept[transform] = kept.get(transform, 0) + n
    splits = {s for tr in TRANSFORMS for s in rows[tr].get("splits", [])}
    parts = [f"{max(ts.values())}× {t}: {r} ({', '.join(ts)})" for (t, r), ts in seen.items()]
    if splits:
        parts.append(
            f"{len(splits)}× MultiheadAttention split into its projections first "
            "(multihead_attention)"
        )
    return f"- **{key}**: " + "; ".join(parts) if parts else None


def _why_not(families: list[Family], api: dict) -> list[str]:
    """Per family: each (module type, reason) a rule left a module for, with the
    transforms it happened under."""
    found = (_left_as_is(f.key, api[f.key]) for f in families)
    return [line for line in found if line]


def _refusals(families: list[Family], api: dict) -> list[str]:
    lines = []
    for family in families:
        for transform in TRANSFORMS:
            e = api[family.key][transform]
            if e["status"] != "ok":
                msg = " ".join(e["message"].split())
                msg = msg if len(msg) <= 400 else msg[:397] + "..."
                kind = e.get("error_type") or "error"
                lines.append(f"- **{family.key} × {transform}** ({kind}): {msg}")
    return lines


def _settings() -> list[str]:
    lines = ["| transform | types (from the registry) | params |", "|---|---|---|"]
    for t in TRANSFORMS:
        params = json.dumps(PARAMS[t])
        if t == "factorize":
            params += f"; near-lossless column: `{json.dumps(NEAR_LOSSLESS)}`"
        lines.append(f"| `{t}` | {', '.join(accepted_types(t))} | `{params}` |")
    return lines


def _api_table(families: list[Family], api: dict, cli: dict | None) -> list[str]:
    head = "| family | source | " + " | ".join(f"`{t}`" for t in TRANSFORMS)
    head += " | factorize near-lossless |"
    sep = "|---|---|" + "---|" * len(TRANSFORMS) + "---|"
    if cli is not None:
        head += " CLI factorize, `--sample-input` file | CLI factorize, default sample |"
        sep += "---|---|"
    rows = [head, sep]
    for f in families:
        cells = [
            _api_text(api[f.key][t], f.refusals.get(t), API_BUGS.get((f.key, t)))
            for t in TRANSFORMS
        ]
        nl = api[f.key]["factorize"].get("near_lossless_error")
        row = f"| `{f.key}` {f.title} | {f.source} | " + " | ".join(cells) + f" | {_err(nl)} |"
        if cli is not None:
            row += f" {_cli_text(f, cli[f.key].get('file'))} |"
            row += f" {_cli_text(f, cli[f.key].get('default'), default=True)} |"
        rows.append(row)
    return rows


def render(api: dict, cli: dict, meta: dict, torchvision: dict | None) -> str:
    out = [
        "# Models tnsurgery is tested on",
        "",
        f"Generated by `{COMMAND}` on {meta['date']} ({meta['machine']}; git commit "
        f"{meta['commit']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"; {meta['seconds']:.0f} s). Do not edit by hand: rerun the command. "
        "`tests/zoo/test_zoo_doc.py` fails when a family of the zoo is missing here.",
        "",
        "The zoo (`tests/zoo/`, part of the default test suite) builds each family tiny "
        "(hidden 16–64, 2 layers, a vocabulary of 96, seeded random init; Linear, Conv1D "
        "and groups=1 Conv2d weights given a power-law spectrum with a knee at a quarter "
        "of their rank, like a trained layer's) and runs one spec rule on `**` with the "
        "types each transform accepts. The Hugging Face families are transformers' own "
        "classes built from their `*Config`; the plain-torch rows rebuild torchvision's "
        "module structure in `tests/zoo/vision.py` (torchvision cannot be imported beside "
        "the development torch: see the last section for the real models).",
        "",
        "Each cell: **ok R/T · E** — R of the T selected modules replaced (the others are "
        "left as they are, for the reasons listed below), E the largest relative error "
        "over the model's float outputs on a second input (not the sample input the "
        "surgery saw); the output after `tnsurgery.save` → `tnsurgery.load` onto a fresh "
        "instance is identical in every ok cell. **refused** — a clear error "
        "(`MatchError`, `SpecError`, `SurgeryError`), nothing written. **xfail** — a "
        "known tnsurgery bug (listed below; an `xfail(strict=True)` test). "
        "`factorize near-lossless` is the error at `energy` 0.9999.",
        "",
        *_settings(),
        "",
        "## Families × transforms",
        "",
        *_api_table(FAMILIES, api, cli),
        "",
        "The CLI columns: `tnsurgery plan`, `apply` on the saved model (a "
        "`save_pretrained` directory, with a tokenizer for the text families; a pickled "
        "module read with `--allow-class tests.zoo.vision` for the plain-torch ones), "
        "`inspect` on the output, and the output loaded back (`io.load_model` and "
        "`tnsurgery.load`) computing exactly what the API's surgery computes; the number is "
        "the output error `apply` reports on its sample input (`none`: not measured, no "
        "sample input).",
        "",
        "## Modules a rule selected but left as they are",
        "",
        *_why_not(FAMILIES, api),
        "",
        "## Refusals",
        "",
        *_refusals(FAMILIES, api),
        "",
        "## Known bugs (xfail)",
        "",
        *[f"- **{k} × {t}**: {v}" for (k, t), v in API_BUGS.items()],
        *[f"- **CLI default sample, {k}**: {v}" for k, v in CLI_DEFAULT_SAMPLE.items()],
        "",
    ]
    out += _torchvision_section(torchvision)
    return "\n".join(out).rstrip() + "\n"


def _torchvision_section(tv: dict | None) -> list[str]:
    out = ["## Real torchvision models", ""]
    if tv is None:
        return out + [
            "Not run yet: `python -m tests.zoo.report --torchvision` in a venv where "
            "torchvision imports writes `tests/zoo/torchvision_results.json`, then "
            f"`{COMMAND}` renders it here.",
            "",
        ]
    meta = tv["meta"]
    out += [
        f"Run by `{meta['command']}` on {meta['date']} in a separate venv ({meta['venv']}: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"; {meta['machine']}; git commit {meta['commit']}; {meta['seconds']:.0f} s), "
        "not part of the default suite: the development venv's torch 2.13.0 cannot import "
        "PyPI's torchvision. Random weights (given the same spectrum as the zoo's), "
        f"`num_classes=10`, input {meta['inputs']}. Same settings and cell format, but "
        f"`{json.dumps(meta.get('params', {}))}` (CP-ALS at `param_ratio` 0.25 takes "
        "minutes per 512-channel conv on a shared CPU).",
        "",
        "| model | " + " | ".join(f"`{t}`" for t in TRANSFORMS) + " | near-lossless |",
        "|---|" + "---|" * (len(TRANSFORMS) + 1),
    ]
    for key, row in tv["results"].items():
        cells = [_api_text(row[t], None if row[t]["status"] == "ok" else "") for t in TRANSFORMS]
        out.append(
            f"| `{key}` | " + " | ".join(cells)
            + f" | {_err(row['factorize'].get('near_lossless_error'))} |"
        )  # fmt: skip
    notes = [line for key, row in tv["results"].items() if (line := _left_as_is(key, row))]
    for key, row in tv["results"].items():
        for t in TRANSFORMS:
            if row[t]["status"] != "ok":
                notes.append(f"- {key} × {t}: {' '.join(row[t]['message'].split())[:300]}")
    return out + ["", "Modules a rule selected but left as they are:", "", *notes, ""]


# -------------------------------------------------------------------------- main


def _meta(start: float) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "commit": _git_commit(),
        "versions": _versions(),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DOC)
    parser.add_argument(
        "--torchvision",
        action="store_true",
        help="run the real torchvision models; write " + TORCHVISION_RESULTS.name,
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    start = time.perf_counter()
    if args.torchvision:
        from .torchvision_zoo import INPUTS, PARAMS, TORCHVISION

        results = run_api(TORCHVISION, Zoo(PARAMS), log)
        meta = {**_meta(start), "command": f"{COMMAND} --torchvision", "inputs": INPUTS,
                "venv": sys.prefix, "params": PARAMS}  # fmt: skip
        TORCHVISION_RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        log(f"wrote {TORCHVISION_RESULTS}")
        return 0
    api = run_api(FAMILIES, Zoo(), log)
    cli = run_clis(FAMILIES, log)
    tv = json.loads(TORCHVISION_RESULTS.read_text()) if TORCHVISION_RESULTS.exists() else None
    args.output.write_text(render(api, cli, _meta(start), tv))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
