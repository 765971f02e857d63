"""What the commands read and where they write: model options, sample inputs, the
default output names, and the input a surgered model records (its ``source``, which
``train`` finds its teacher by)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import click
import torch

from tnsurgery import io
from tnsurgery.cli.app import err
from tnsurgery.cli.samples import check_sample, resolve_sample
from tnsurgery.cli.samples import resolve_sample_input as resolve_sample_input  # re-exported
from tnsurgery.cli.shapes import MAX_SAMPLE_ELEMENTS as MAX_SAMPLE_ELEMENTS  # re-exported
from tnsurgery.cli.shapes import parse_shape as parse_shape  # re-exported
from tnsurgery.errors import UserInputError
from tnsurgery.manifest import get_manifest
from tnsurgery.spec import load_spec


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
    """--sample-input / --no-sample-input."""

    @click.option(
        "--sample-input",
        "sample_input",
        metavar="SPEC",
        help="What to trace, count FLOPs and measure the output error on: a .txt file (one "
        "sentence a line, through the model's tokenizer; its first 64 lines), a .pt or "
        ".safetensors file of tensors (a tensor, a tuple of positional inputs or a dict of "
        "keyword inputs), a shape like 8x3x32x32 (random floats), int:2x16:VOCAB (random "
        "token ids), or 'auto'. Default: the spec's evaluation data, else calibration "
        "examples it holds out, else for Hugging Face text models 16 built-in sentences "
        "(random ids, with a warning, when the model has no tokenizer).",
    )
    @click.option("--no-sample-input", is_flag=True, help="Do not use any sample input.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def load_input(model_path: str, arch, trust_pickle, allow_class) -> io.LoadedModel:
    """Read MODEL as the model options say, with a status line."""
    with err.status(f"loading {model_path}"):
        return io.load_model(
            model_path, arch=arch, trust_pickle=trust_pickle, allow_classes=allow_class
        )


def load_teacher(path: str | None, arch, trust_pickle, allow_class) -> io.LoadedModel | None:
    """The model ``--teacher`` names (``arch``: ``--teacher-arch``, else ``--arch``)."""
    return load_input(path, arch, trust_pickle, allow_class) if path else None


def recorded_teacher(
    model: torch.nn.Module, model_path: str, spec_path: str, arch: str | None
) -> io.LoadedModel:
    """The model a surgered ``model`` was made from, found through its manifest.

    The manifest is data: its recorded ``arch`` is only shown, never imported. A
    Hugging Face directory is read by its config (installed transformers classes
    only); a pickle with the default allow list (no flag given for MODEL carries
    over); a state dict or ``.safetensors`` only with the architecture the user
    gives (``arch``: ``--teacher-arch`` or ``--arch``). Otherwise the error says the
    exact command to run.
    """
    src, why = recorded_source(model)
    if why is not None:
        raise UserInputError(
            "mode 'distill' needs the original model: give --teacher ORIGINAL_MODEL"
            + (f" ({why})" if src is not None else "")
        )
    path, kind, hint = str(src["path"]), src.get("kind"), src.get("arch")
    if kind in ("state_dict", "safetensors") and not arch:
        shown = hint if isinstance(hint, str) else "pkg.module:factory"
        raise UserInputError(
            f"mode 'distill' needs the original model: {model_path} was surgered from {path}, "
            "which needs its architecture. tnsurgery never runs code named in a manifest; "
            f"if you trust {shown}, run: tnsurgery train {spec_path} {model_path} "
            f"--teacher {path} --teacher-arch {shown}"
        )
    try:
        return load_input(path, arch if kind != "hf" else None, False, ())
    except UserInputError as exc:
        raise UserInputError(
            f"{exc}\n(the teacher was found through the manifest of {model_path}: flags given "
            "for MODEL do not apply to it; give --teacher PATH with its own flags)"
        ) from None


def plan_arguments(f):
    """SPEC MODEL and the options of every command that plans (plan, apply)."""
    f = click.option(
        "--allow-empty",
        is_flag=True,
        help="Do not fail on rules that match nothing, nor on a surgery that replaces nothing.",
    )(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = sample_options(f)
    f = model_options(f)
    f = click.argument("model", type=click.Path())(f)
    f = click.argument("spec", type=click.Path(dir_okay=False))(f)
    return f


def prepare(spec, model, arch, trust_pickle, allow_class, sample_input, no_sample_input):
    """Spec first (cheap, and its errors matter most), then the model and the sample
    input (:class:`~tnsurgery.cli.samples.Sample`), checked on the model."""
    s = load_spec(spec)
    loaded = load_input(model, arch, trust_pickle, allow_class)
    with err.status("preparing the sample input"):
        x = resolve_sample(sample_input, loaded, no_sample_input, s)
        check_sample(loaded.model, x)
    return s, loaded, x


def check_spec_writes(spec, inputs: list[Path], outputs: list[Path]) -> None:
    """The files a spec makes training write (``training.log``, ``checkpoint.dir``,
    ``tensorboard``) stay apart from the input's files and from the output set."""
    t = spec.training
    if t is None:
        return
    named = [
        (field, Path(value))
        for field, value in (
            ("training.log", t.log),
            ("training.tensorboard", t.tensorboard),
            ("training.checkpoint.dir", t.checkpoint.dir if t.checkpoint else None),
        )
        if value
    ]
    for field, path in named:
        io.check_apart([path], inputs, what=f"the spec's {field}")
        io.check_apart([path], outputs, what=f"the spec's {field}")


def fingerprint(path: Path) -> str:
    """A cheap identity of a model file or directory: the names, sizes and
    modification times of its files (a directory's own files, not its subfolders;
    no content is read)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def source_record(loaded: io.LoadedModel) -> dict[str, Any]:
    """What ``tnsurgery apply`` records of its input in the manifest (``"source"``), so
    that ``tnsurgery train`` can find the original model again as the teacher."""
    return {
        "path": str(loaded.path.resolve()),
        "kind": loaded.kind,
        "arch": loaded.arch,
        "fingerprint": fingerprint(loaded.path),
    }


def recorded_source(model: torch.nn.Module) -> tuple[dict[str, Any] | None, str | None]:
    """The model a surgered ``model`` was made from, as ``apply`` recorded it, and
    why it cannot be used (``None`` when it can: the file is there, unchanged)."""
    manifest = get_manifest(model) or {}
    src = manifest.get("source")
    if not isinstance(src, dict) or not isinstance(src.get("path"), str) or not src["path"]:
        return None, "no source recorded"
    if src.get("kind") not in ("hf", "pickle", "state_dict", "safetensors"):
        return None, "the recorded source is malformed"
    where = Path(src["path"])
    if not where.exists():
        return src, f"{where}, which it was surgered from, is gone"
    # a model file, or a Hugging Face directory: nothing else is ever looked into
    model_dir = src["kind"] == "hf" and where.is_dir() and (where / "config.json").is_file()
    if not (model_dir or (src["kind"] != "hf" and where.is_file())):
        what = "directory" if src["kind"] == "hf" else "file"
        return src, f"the recorded source {where} is not a model {what}"
    try:
        same = fingerprint(where) == src.get("fingerprint")
    except OSError as exc:
        return src, f"{where} cannot be read: {exc.strerror or exc}"
    if not same:
        return src, f"{where}, which it was surgered from, has changed since"
    return src, None


def default_output(loaded: io.LoadedModel, tag: str = "surgered") -> Path:
    """Where ``tnsurgery apply`` (``tag`` "surgered") or ``export`` ("exported") writes
    when no ``-o`` is given: beside the input."""
    p = loaded.path
    if loaded.kind == "hf":
        return p.with_name(f"{p.name}-{tag}")
    stem, _, ext = p.name.partition(".")
    for earlier in ("surgered.", "trained.", "exported."):
        if ext.startswith(earlier) and f"{tag}." != earlier:
            ext = ext[len(earlier) :]
    return p.with_name(f"{stem}.{tag}.{ext or 'pt'}")


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file in a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
