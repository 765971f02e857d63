"""The built-in data sources: ``tensors``, ``callable``, ``text`` and ``random``.

A plugin like any other: nothing in tnsurgery's core imports this module; it is
registered through the ``tnsurgery`` entry-point group (``register_data_sources``),
exactly as a third party's sources are.

- ``tensors``: a file of tensors (a tensor, a tuple/list or a dict of
  tensors with the examples along dim 0), loaded with ``weights_only=True``;
- ``callable``: ``pkg.module:function`` called with ``kwargs``, returning an
  iterable of batches (the one place a spec names code: see SECURITY.md);
- ``text``: a text file, one example a line, tokenized with the tokenizer of
  the Hugging Face model (or ``tokenizer``, a directory), ``max_length``;
- ``random``: random floats of ``shape``, or token ids below ``vocab_size``
  (a Hugging Face dict batch): data-free;
- ``sentences``: built-in English sentences (:mod:`tnsurgery.builtins.corpora`:
  everyday sentences from a grammar, or the standard library's docstrings), tokenized
  like ``text``: label-free text, offline, for a calibration when the user has none.

A spec may come from someone else: a ``path`` must be a regular file (a symlink to
one counts), never a FIFO, a device or a directory, checked before it is opened (a
FIFO would block, ``/dev/zero`` never ends), and at most :data:`MAX_TEXT_BYTES`
(``text``) or :data:`MAX_TENSORS_BYTES` (``tensors``); a tokenizer directory holds
only regular files and directories.
"""

from __future__ import annotations

import inspect
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file

from tnsurgery.builtins.corpora import SentencesParams, sentences_batches
from tnsurgery.builtins.tokenizing import TokenizedParams, text_source_batches
from tnsurgery.data import split
from tnsurgery.datasource import DataContext, DataSource
from tnsurgery.errors import DataSourceError, UserInputError
from tnsurgery.hookspecs import hookimpl
from tnsurgery.io import cwd_on_path, import_name
from tnsurgery.pickles import load_weights_only

MAX_TEXT_BYTES = 1 << 30
"""Largest file of the ``text`` source (1 GiB); also the largest file of a tokenizer
directory (weights aside)."""
MAX_TEXT_LINES = 1 << 24
"""Most non-empty lines of the ``text`` source (16,777,216): each is a string held
until the run ends."""
MAX_TENSORS_BYTES = 1 << 34
"""Largest file of the ``tensors`` source (16 GiB): it is loaded whole."""

# -------------------------------------------------------------------- files


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _check_file(source: str, path: Path, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise DataSourceError(
            source, f"not a regular file but a {_kind(st.st_mode)}", f"path {path}"
        )
    if st.st_size > limit:
        raise DataSourceError(
            source,
            f"the file has {st.st_size:,} bytes, more than the limit of {limit:,}",
            f"path {path}",
        )


def _stat_file(source: str, path: Path, limit: int) -> None:
    """``path`` is a regular file of at most ``limit`` bytes (a symlink to one counts)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataSourceError(source, "no such file", f"path {path}") from None
    except OSError as exc:
        raise DataSourceError(source, f"cannot read it: {exc}", f"path {path}") from None
    _check_file(source, path, st, limit)


def _open_file(source: str, path: Path, limit: int) -> BinaryIO:
    """``path`` opened for reading, checked by :func:`_stat_file` before it is opened
    and again once open (the file read is the file checked)."""
    _stat_file(source, path, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        f = os.fdopen(os.open(path, flags), "rb")
    except OSError as exc:
        raise DataSourceError(source, f"cannot read it: {exc}", f"path {path}") from None
    try:
        _check_file(source, path, os.fstat(f.fileno()), limit)
    except BaseException:
        f.close()
        raise
    return f


# ------------------------------------------------------------------ tensors


class TensorsParams(BaseModel):
    """``tensors``: a ``.pt`` file (or ``.safetensors``) of tensors."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="File of a tensor, a tuple/list or a dict of tensors.")


def tensors_batches(params: TensorsParams, ctx: DataContext) -> Iterator[Any]:
    """Split the file's tensors into batches along dim 0."""
    path = Path(params.path)
    try:
        if path.suffix == ".safetensors":
            _stat_file("tensors", path, MAX_TENSORS_BYTES)
            data: Any = load_file(str(path))
        else:
            with _open_file("tensors", path, MAX_TENSORS_BYTES) as f:
                data = load_weights_only(f, path)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"data: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(data, list):
        data = tuple(data)
    values = data.values() if isinstance(data, dict) else data
    ok = isinstance(data, torch.Tensor) or (
        isinstance(data, (tuple, dict))
        and data
        and all(isinstance(v, torch.Tensor) for v in values)
    )
    if not ok:
        raise UserInputError(
            f"data: {path} holds a {type(data).__name__}; expected a tensor, a tuple or a "
            "dict of tensors"
        )
    return split(data, ctx.batch_size)


# ----------------------------------------------------------------- callable


class CallableParams(BaseModel):
    """``callable``: ``pkg.module:function`` returning an iterable of batches."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(
        ..., pattern=r"^[\w.]+:[\w.]+$", description="pkg.module:function returning batches."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments. A function with a parameter named 'seed' or "
        "'batch_size' (not given here) gets the run's: training passes seed + epoch, so a "
        "shuffling loader replays the same epochs after a resume.",
    )


def callable_batches(params: CallableParams, ctx: DataContext) -> Iterable[Any]:
    """Import and call the function; its batches are used as they come.

    ``seed`` (training: the spec's seed plus the epoch) and ``batch_size`` are
    passed when the function has a parameter of that very name (not merely
    ``**kwargs``, which often forwards to something that does not take them) and
    the spec's ``kwargs`` do not set it."""
    module, _, name = params.target.partition(":")
    try:
        with cwd_on_path():
            fn = import_name(f"{module}.{name}")
    except ImportError as exc:
        raise DataSourceError(
            "callable", f"cannot import it: {exc}", f"target {params.target}"
        ) from None
    kwargs = dict(params.kwargs)
    for key, value in (("seed", ctx.seed), ("batch_size", ctx.batch_size)):
        if key not in kwargs and _accepts(fn, key):
            kwargs[key] = value
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise DataSourceError(
            "callable", exc, f"target {params.target}, called with {', '.join(kwargs) or 'none'}"
        ) from exc


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` can be called with the keyword ``name``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    for p in sig.parameters.values():
        if p.name == name and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


# --------------------------------------------------------------------- text


class TextParams(TokenizedParams):
    """``text``: a text file, one example a line, tokenized for a Hugging Face model."""

    path: str = Field(..., description="Text file, one example a line (blank lines skipped).")


def text_batches(params: TextParams, ctx: DataContext) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenize the lines, ``batch_size`` at a time (padded to the longest of the batch)."""
    path = Path(params.path)
    lines = _read_lines(path)
    if not lines:
        raise UserInputError(f"data: {path} has no non-empty line")
    yield from text_source_batches(lines, params, ctx, "text")


def _read_lines(path: Path) -> list[str]:
    """The non-empty lines of ``path``, stripped: at most :data:`MAX_TEXT_BYTES` read,
    at most :data:`MAX_TEXT_LINES` kept."""
    lines: list[str] = []
    read = 0
    with _open_file("text", path, MAX_TEXT_BYTES) as f:
        try:
            while raw := f.readline(MAX_TEXT_BYTES + 1 - read):  # never past the limit
                read += len(raw)
                if read > MAX_TEXT_BYTES:  # grew since it was checked
                    raise DataSourceError(
                        "text", f"more than the limit of {MAX_TEXT_BYTES:,} bytes", f"path {path}"
                    )
                # split at b"\n" first, which is never inside a UTF-8 character
                lines.extend(s for ln in raw.decode("utf-8").splitlines() if (s := ln.strip()))
                if len(lines) > MAX_TEXT_LINES:
                    raise DataSourceError(
                        "text", f"more than {MAX_TEXT_LINES:,} non-empty lines", f"path {path}"
                    )
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"data: cannot read {path}: {exc}") from None
    return lines


# ------------------------------------------------------------------- random


MAX_RANDOM_EXAMPLE = 2**24  # elements of one random example (64 MiB of float32)
MAX_RANDOM_BATCH = 2**28  # elements of one random batch (1 GiB of float32)


class RandomParams(BaseModel):
    """``random``: data-free batches (floats, or token ids for a text model)."""

    model_config = ConfigDict(extra="forbid")
    shape: list[Annotated[int, Field(ge=1)]] = Field(
        ...,
        min_length=1,
        max_length=8,
        description="Shape of one example (no batch dim), e.g. [3, 32, 32]; at most "
        f"{MAX_RANDOM_EXAMPLE:,} elements.",
    )

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_RANDOM_EXAMPLE:
            raise ValueError(
                f"an example of shape {shape} has {math.prod(shape):,} elements, more than "
                f"{MAX_RANDOM_EXAMPLE:,}"
            )
        return shape

    dtype: Literal["float32", "float16", "bfloat16", "int64"] = Field(
        "float32", description="int64 draws token ids below vocab_size."
    )
    vocab_size: int | None = Field(
        None, ge=2, description="Token ids below this (dtype int64): a Hugging Face dict batch."
    )
    samples: int = Field(512, ge=1, description="Examples in all.")


def random_batches(params: RandomParams, ctx: DataContext) -> Iterator[Any]:
    """Seeded random batches: standard normal floats, or uniform token ids with a full
    attention mask."""
    g = torch.Generator().manual_seed(ctx.seed)
    if min(ctx.batch_size, params.samples) * math.prod(params.shape) > MAX_RANDOM_BATCH:
        raise UserInputError(
            f"data: random batches of {ctx.batch_size} x {params.shape} would hold more than "
            f"{MAX_RANDOM_BATCH:,} elements: use a smaller batch_size"
        )
    left = params.samples
    while left > 0:
        n = min(ctx.batch_size, left)
        left -= n
        shape = (n, *params.shape)
        if params.dtype == "int64" or params.vocab_size is not None:
            if params.vocab_size is None:
                raise UserInputError("data: source 'random' with dtype int64 needs vocab_size")
            ids = torch.randint(0, params.vocab_size, shape, generator=g)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            yield torch.randn(shape, generator=g).to(getattr(torch, params.dtype))


@hookimpl
def register_data_sources(register):
    """Register the built-in sources: tensors, callable, text, random, sentences."""
    register(DataSource("tensors", TensorsParams, tensors_batches, "A file of tensors."))
    register(
        DataSource(
            "callable", CallableParams, callable_batches, "pkg.module:function returning batches."
        )
    )
    register(DataSource("text", TextParams, text_batches, "A text file, one example a line."))
    register(DataSource("random", RandomParams, random_batches, "Random inputs (data-free)."))
    register(
        DataSource(
            "sentences",
            SentencesParams,
            sentences_batches,
            "Built-in English sentences (everyday, or the standard library's docstrings): "
            "label-free text for a calibration when you have none.",
        )
    )
