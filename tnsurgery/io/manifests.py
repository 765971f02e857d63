"""A manifest on disk, read as a validated document before anything is built.

A manifest file is untrusted data. :func:`read_document` finds it (a directory's
``manifest.json``, ``x.manifest.json`` beside ``x.safetensors``/``x.pt``, or the
copy inside a ``.safetensors`` file's metadata), bounds its size and nesting,
checks its format and version, parses it into the typed
:class:`~tnsurgery.manifest.Manifest`, confines the weights file it names to the
manifest's own directory (no ``..``, no absolute path, no symlink leading out), and
checks the sizes and hashes of the output set it lists (:func:`verify_files`).
:func:`read_header` gives the tensors' names, shapes and dtypes from a
``.safetensors`` header without reading any tensor data, so that layer configs are
checked against them before any allocation. Every defect is a
:class:`~tnsurgery.errors.ModelLoadError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open

from tnsurgery.errors import ModelLoadError
from tnsurgery.io.files import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    WEIGHTS_NAME,
    check_header_size,
    safetensors_errors,
    short,
    sidecar_manifest,
)
from tnsurgery.io.outputs import sha256
from tnsurgery.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, Manifest

FILE_FIELDS = ("weights", "aliases", "files", "guards")  # about the files, not the model
MAX_MANIFEST_DEPTH = 64  # nesting of a manifest's values (a real one: about 10)
MAX_MANIFEST_VALUES = 1_000_000  # values in all (a real one: about 60 per layer)
#: torch dtype -> its name in a safetensors header (the format's names)
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}

#: a safetensors dtype name -> bytes an element
DTYPE_BYTES = {tag: dtype.itemsize for dtype, tag in SAFETENSORS_DTYPES.items()}


def shape_problem(value: Any) -> str | None:
    """Why ``value`` (JSON data) is too deep or too large to be a manifest, checked
    without recursion and before any parsing into objects; ``None`` when it is not."""
    stack = [(value, 0)]
    count = 0
    while stack:
        v, depth = stack.pop()
        count += 1
        if depth > MAX_MANIFEST_DEPTH:
            return f"nested deeper than {MAX_MANIFEST_DEPTH} levels"
        if count > MAX_MANIFEST_VALUES:
            return f"more than {MAX_MANIFEST_VALUES:,} values"
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return None


@dataclass
class Document:
    """A validated manifest and the file-level fields around it."""

    manifest: Manifest
    where: Path  # the file the manifest was read from (for messages)
    weights: Path  # the .safetensors file it describes, inside its directory
    aliases: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] | None = None
    # empty tensors of a Hugging Face output that make a loader without tnsurgery fail
    # (see tnsurgery.io.hf_entry); never part of the model
    guards: list[str] = field(default_factory=list)
    # what the replacements were read from, and the path of their field, for messages
    what: str = "manifest"
    prefix: str = ""


@dataclass
class TensorInfo:
    """A tensor as a ``.safetensors`` header describes it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data (a dtype not listed counts one byte an element)."""
        return self.numel * DTYPE_BYTES.get(self.dtype, 1)


def _decode(text: str | bytes, where: Path) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{where}: unreadable manifest: {short(exc)}") from None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelLoadError(
                f"{path}: a manifest of {path.stat().st_size} bytes is larger than "
                f"{MAX_MANIFEST_BYTES} bytes: refused"
            )
        return _decode(path.read_bytes(), path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such manifest") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: a directory, not a manifest file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: unreadable manifest: {short(exc)}") from None


def confined(directory: Path, name: Any, where: Path, field_name: str) -> Path:
    """``directory / name`` for a plain file name that stays in ``directory`` (no
    separators, ``..``, absolute paths, or a symlink leading out)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise ModelLoadError(
            f"{where}: malformed manifest: field '{field_name}' is not a file name"
        )
    if "/" in name or "\\" in name or "\x00" in name or Path(name).is_absolute():
        raise ModelLoadError(
            f"{where}: field '{field_name}' ({name!r}) must name a file in the manifest's own "
            "directory: paths are refused"
        )
    path = directory / name
    try:
        inside = path.resolve().parent == directory.resolve()
    except OSError:
        inside = False
    if not inside:
        raise ModelLoadError(
            f"{where}: field '{field_name}' ({name!r}) leads out of the manifest's directory "
            "(a symbolic link): refused"
        )
    return path


def _check_format(raw: Any, where: object) -> dict:
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ModelLoadError(f"{where}: not a tnsurgery manifest (field 'format')")
    problem = shape_problem(raw)
    if problem:
        raise ModelLoadError(f"{where}: malformed manifest: {problem}")
    version = raw.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        raise ModelLoadError(
            f"{where}: manifest format_version {version} was written by a newer tnsurgery "
            f"(this one reads up to {MANIFEST_VERSION}): upgrade tnsurgery"
        )
    return raw


def _locate(path: Path) -> tuple[dict, Path, Path]:
    """The raw manifest, the file it came from, and the directory its names are in."""
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.exists():
            raise ModelLoadError(f"{path}: no {MANIFEST_NAME} in this directory")
    elif path.suffix == ".safetensors" and not sidecar_manifest(path).exists():
        metadata = read_metadata(path)
        if "tnsurgery_manifest" not in metadata:
            raise ModelLoadError(f"{path}: no tnsurgery manifest beside or inside this file")
        text = metadata["tnsurgery_manifest"]
        if len(text) > MAX_MANIFEST_BYTES:
            raise ModelLoadError(
                f"{path}: the manifest inside it is larger than {MAX_MANIFEST_BYTES} bytes: refused"
            )
        raw = _check_format(_decode(text, path), path)
        raw = {**raw, "weights": path.name}  # the manifest inside describes this very file
        return raw, path, path.parent
    elif path.name.endswith(".json"):
        manifest_path = path
    else:
        manifest_path = sidecar_manifest(path)
    return _check_format(_read_json(manifest_path), manifest_path), manifest_path, path.parent


def read_document(path: Path) -> Document:
    """Find and validate the manifest of a saved model (see the module docstring)."""
    raw, where, directory = _locate(path)
    if where.name.endswith(".json"):
        directory = where.parent
    weights = confined(directory, raw.get("weights", WEIGHTS_NAME), where, "weights")
    aliases = raw.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ModelLoadError(f"{where}: malformed manifest: field 'aliases' is not a name map")
    guards = raw.get("guards") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise ModelLoadError(f"{where}: malformed manifest: field 'guards' is not a list of names")
    files = raw.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(
            isinstance(v, dict)
            and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    ):
        raise ModelLoadError(
            f"{where}: malformed manifest: field 'files' is not a map of name -> {{bytes, sha256}}"
        )
    return Document(validated(raw, where), where, weights, aliases, files, guards)


def validated(raw: Any, where: object) -> Manifest:
    """The typed manifest of ``raw`` (its format, version and depth checked; the
    file-level fields ``weights``, ``aliases``, ``files`` left aside); a malformed one
    is a :class:`ModelLoadError` naming ``where`` and the field."""
    raw = _check_format(raw, where)
    try:
        return Manifest.model_validate({k: v for k, v in raw.items() if k not in FILE_FIELDS})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelLoadError(
            f"{where}: malformed manifest: field '{loc}': {first['msg']}"
        ) from None
    except RecursionError:
        raise ModelLoadError(f"{where}: malformed manifest: nested too deeply") from None


def verify_files(doc: Document) -> None:
    """Check every file the manifest lists (size, then SHA-256): a set that an
    interrupted write left mixed or incomplete is refused."""
    if not doc.files:
        return
    directory = doc.where.parent
    for name, rec in doc.files.items():
        path = confined(directory, name, doc.where, f"files.{name}")
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != rec["bytes"]:
            problem = f"has {path.stat().st_size} bytes, the manifest says {rec['bytes']}"
        elif sha256(path) != rec["sha256"]:
            problem = "does not have the content the manifest lists (SHA-256)"
        if problem:
            raise ModelLoadError(
                f"{path} {problem}: the output set of {doc.where} is incomplete or mixed "
                "(an interrupted write, or a file replaced since): write the output again"
            )


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (header only)."""
    check_header_size(path)
    with safetensors_errors(path), safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> shape and dtype of every tensor of a ``.safetensors`` file, from its
    header alone (no tensor data is read)."""
    check_header_size(path)
    with safetensors_errors(path), safe_open(str(path), framework="pt") as f:
        out = {}
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = TensorInfo(tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
        return out
