"""What the commands read and where they write: model options, sample inputs, the
default output names, and the input a surgered model records (its ``source``, which
``train`` finds its teacher by)."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import click
import torch

from tnsurgery import io
from tnsurgery.cli.app import err
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
        help="A .pt file of tensors (tensor, tuple or dict), a shape like 8x3x32x32 "
        "(random floats), int:2x16:VOCAB (random ids), or 'auto' (Hugging Face models; "
        "their default). Used to trace, count FLOPs and measure the output error.",
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


MAX_SAMPLE_ELEMENTS = 2**28  # a random sample input of at most 1 GiB of float32


def parse_shape(text: str) -> tuple[int, ...]:
    """``8x3x32x32`` -> ``(8, 3, 32, 32)``: positive sizes, at most
    :data:`MAX_SAMPLE_ELEMENTS` elements in all."""
    parts = text.lower().split("x")
    if not parts or len(parts) > 8 or not all(p.isdigit() and len(p) <= 12 for p in parts):
        raise UserInputError(f"--sample-input: bad shape {text!r} (expected e.g. 8x3x32x32)")
    dims = tuple(int(d) for d in parts)
    if any(d <= 0 for d in dims):
        raise UserInputError(f"--sample-input: bad shape {text!r} (every size at least 1)")
    if math.prod(dims) > MAX_SAMPLE_ELEMENTS:
        raise UserInputError(
            f"--sample-input: shape {text!r} has more than {MAX_SAMPLE_ELEMENTS:,} elements"
        )
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
        high_text = parts[2]
        if not high_text.isdigit() or len(high_text) > 12 or int(high_text) < 1:
            raise UserInputError(
                f"--sample-input: bad upper bound {high_text!r} (a vocabulary size, at least 1)"
            )
        high = int(high_text)
        return torch.randint(0, high, parse_shape(parts[1]), generator=g)
    path = Path(text)
    if path.exists():
        if path.suffix == ".safetensors":
            state, _ = io.read_safetensors(path)
            return state
        obj = io.torch_load_safely(path)
        if isinstance(obj, (torch.Tensor, tuple, list, dict)):
            return tuple(obj) if isinstance(obj, list) else obj
        raise UserInputError(f"--sample-input {path}: expected tensors, got {type(obj).__name__}")
    if any(c.isdigit() for c in text) and set(text.lower()) <= set("0123456789x"):
        shape = parse_shape(text)
        ref = next(iter(model.parameters()), None) if model is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        return torch.randn(shape, generator=g).to(dtype)
    raise UserInputError(f"--sample-input {text!r}: no such file, and not a shape like 8x3x32x32")


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
    """Spec first (cheap, and its errors matter most), then the model and the sample input."""
    s = load_spec(spec)
    loaded = load_input(model, arch, trust_pickle, allow_class)
    return s, loaded, resolve_sample_input(sample_input, loaded, no_sample_input)


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
