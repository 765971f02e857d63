"""The files themselves: names, reading ``.safetensors``, loading a state dict only
when all of it fits, and importing a named object (``--arch``, allowed pickle classes,
the ``callable`` data source: names the user gave)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from tnsurgery.errors import ModelLoadError, UserInputError

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest of a 10 000-layer model is a few MB
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


@dataclass
class LoadedModel:
    """A model read from disk, with what is needed to write it back in the same kind.

    ``kind`` is ``"pickle"``, ``"state_dict"``, ``"safetensors"`` or ``"hf"``;
    ``sources`` lists every file that defines it (the input, its manifest and the
    weights that manifest names), which no output may touch.
    """

    model: nn.Module
    kind: str
    path: Path
    arch: str | None = None
    sources: list[Path] = field(default_factory=list)  # every file that defines it

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = [self.path]


@contextmanager
def cwd_on_path() -> Iterator[None]:
    """Make modules in the working directory importable, as ``python -c`` would.

    The ``tnsurgery`` console script does not put the working directory on
    ``sys.path``; ``--arch`` factories and the classes of a pickle the user
    trusts are looked up there too.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_name(name: str) -> Any:
    """Import ``pkg.module.Attr`` (nested attributes allowed)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ImportError(f"cannot import {name}")


def short(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def build_arch(arch: str) -> nn.Module:
    """Call ``pkg.module:factory`` (a function or a class) with no arguments."""
    if ":" not in arch:
        raise UserInputError(f"--arch must look like pkg.module:factory, got {arch!r}")
    modname, _, attr = arch.partition(":")
    try:
        with cwd_on_path():
            module = importlib.import_module(modname)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"--arch {arch}: cannot import: {short(exc)}") from None
    try:
        model = factory()
    except Exception as exc:
        raise UserInputError(f"--arch {arch}: the factory failed: {short(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_state_dict_fitting(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` only if all of it fits: on error nothing was copied."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {', '.join(wrong[:5])}")
    if parts:
        raise ModelLoadError(f"{source}: weights do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


MAX_HEADER_BYTES = 32 << 20  # a .safetensors header (a real shard's: a few hundred KB)


def check_header_size(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header (the JSON before the tensors) is
    larger than :data:`MAX_HEADER_BYTES`, before the library parses it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it: {short(exc)}") from None
    if len(head) == 8 and int.from_bytes(head, "little") > MAX_HEADER_BYTES:
        raise ModelLoadError(
            f"{path}: a .safetensors header of {int.from_bytes(head, 'little'):,} bytes is "
            f"larger than {MAX_HEADER_BYTES:,}: refused"
        )


@contextmanager
def safetensors_errors(path: Path) -> Iterator[None]:
    """Turn what reading a ``.safetensors`` file can raise into a clear
    :class:`ModelLoadError` naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path}: cannot read this .safetensors file (truncated or corrupt): {short(exc)}"
        ) from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a ``.safetensors`` file (clear errors)."""
    check_header_size(path)
    with safetensors_errors(path):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata


def sidecar_manifest(path: Path) -> Path:
    """``x.manifest.json`` beside ``x.pt`` / ``x.safetensors``."""
    return path.with_name(path.name.rsplit(".", 1)[0] + ".manifest.json")
