"""A Hugging Face checkpoint read lazily: its shards, their headers, one tensor at a time.

:meth:`Checkpoint.open` reads what describes the weights and nothing more: the
shard index (``model.safetensors.index.json``, bounded and validated as untrusted
data: every shard it names confined to the directory and present) or the single
``model.safetensors``, then every shard's header (names, shapes, dtypes; a
truncated or corrupt shard is refused here, before any tensor data is read).
:meth:`Checkpoint.tensor` then reads one tensor through safetensors' ``safe_open``
(memory-mapped: the rest of the shard is never loaded). Every defect is a
:class:`~tnsurgery.errors.ModelLoadError` naming the file and the tensor.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tnsurgery.errors import ModelLoadError
from tnsurgery.io.files import WEIGHTS_NAME, safetensors_errors, short
from tnsurgery.io.manifests import TensorInfo, read_header
from tnsurgery.io.outputs import link_stays_inside
from tnsurgery.io.skeleton import checkpoint_names

__all__ = ["INDEX_NAME", "Checkpoint", "Weights", "has_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # a 400-shard index of a 70B model: about 2 MB
MAX_SHARDS = 100_000

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds safetensors weights (a single file or an index)."""
    return (directory / INDEX_NAME).is_file() or (directory / WEIGHTS_NAME).is_file()


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name."""
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise ModelLoadError(
                f"{path}: an index of {size:,} bytes is larger than {MAX_INDEX_BYTES:,}: refused"
            )
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except ModelLoadError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a readable shard index (JSON): {short(exc)}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelLoadError(f"{path}: malformed shard index: field 'weight_map' is not a name map")
    if len(set(weight_map.values())) > MAX_SHARDS:
        raise ModelLoadError(f"{path}: more than {MAX_SHARDS:,} shards: refused")
    return weight_map


def _shard(directory: Path, name: str, index: Path) -> Path:
    """The shard ``name`` of the index: a plain file name in ``directory`` (or a link
    into the Hugging Face hub cache's blobs of the repository it is a snapshot of)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ModelLoadError(
            f"{index}: shard name {name!r} is not a file name of the index's own directory: refused"
        )
    path = directory / name
    if path.is_symlink() and not link_stays_inside(path, directory):
        raise ModelLoadError(
            f"{index}: shard {name} is a symbolic link out of {directory}: refused"
        )
    return path


@dataclass
class Checkpoint:
    """The safetensors weights of a model directory, read lazily (see the module
    docstring). Use as a context manager, or call :meth:`close`."""

    directory: Path
    shards: list[Path]
    where: dict[str, Path]  # tensor name -> its shard
    header: dict[str, TensorInfo]
    index: Path | None = None
    _files: dict[Path, Any] = field(default_factory=dict, repr=False)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        """Validate the index and every shard's header (no tensor data read)."""
        directory = Path(directory)
        index_path = directory / INDEX_NAME
        if index_path.is_file():
            weight_map = _read_index(index_path)
            names = sorted(set(weight_map.values()))
            shards = [_shard(directory, n, index_path) for n in names]
            for shard in shards:
                if not shard.is_file():
                    raise ModelLoadError(
                        f"{shard}: missing: the shard index {index_path} names it "
                        f"(for {next(k for k, v in weight_map.items() if directory / v == shard)})"
                    )
        else:
            single = directory / WEIGHTS_NAME
            if not single.is_file():
                raise ModelLoadError(f"{directory}: no {WEIGHTS_NAME} nor {INDEX_NAME}")
            index_path, weight_map, shards = None, None, [single]
        where: dict[str, Path] = {}
        header: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in read_header(shard).items():
                if name in where:
                    raise ModelLoadError(
                        f"{shard}: tensor {name} is also in {where[name].name}: which one holds it?"
                    )
                where[name], header[name] = shard, info
        if weight_map is not None:
            for name, shard_name in weight_map.items():
                if name not in where:
                    raise ModelLoadError(
                        f"{directory / shard_name}: has no tensor {name}, which the shard "
                        f"index {index_path} says it holds"
                    )
        return cls(directory, shards, where, header, index_path)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, on the CPU."""
        shard = self.where.get(name)
        if shard is None:
            raise ModelLoadError(f"{self.directory}: the checkpoint has no tensor {name}")
        with safetensors_errors(shard):
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = self._stack.enter_context(
                    safe_open(str(shard), framework="pt")
                )
            return f.get_tensor(name)

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor, from the header."""
        return self.header[name].nbytes

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of one tensor, from the header (``None`` for a dtype torch
        has no name for here)."""
        return DTYPES.get(self.header[name].dtype)

    def shard_bytes(self) -> int:
        """Bytes of the largest shard file."""
        return max(s.stat().st_size for s in self.shards)

    def total_bytes(self) -> int:
        """Bytes of every shard file."""
        return sum(s.stat().st_size for s in self.shards)

    def close(self) -> None:
        """Close every shard opened."""
        self._files.clear()
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Weights:
    """Where each of a model's tensors is in a checkpoint: the checkpoint's names read
    as the model's (:func:`~tnsurgery.io.skeleton.renamer`), tied parameters found
    under any of their names. :meth:`check` compares every shape with the model's
    before anything is read; :meth:`fill` puts the tensors of some modules in place."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, materialized: bool = False) -> None:
        self.model = model
        self.materialized = materialized  # a model loaded whole (by from_pretrained)
        self.ckpt = ckpt
        self.key_of, self.converted = checkpoint_names(model, list(ckpt.header))
        self.names: dict[int, list[str]] = {}  # id of a parameter -> its names
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
        self.filled: dict[int, nn.Parameter] = {}  # id of a meta parameter -> its tensor
        self.meta_of: dict[int, nn.Parameter] = {}  # id of a filled parameter -> its meta one
        self.restore: dict[int, nn.Parameter] = {}  # what the last forget() dropped

    def key(self, p: nn.Parameter) -> str | None:
        """The checkpoint's name of parameter ``p`` (any name of a tied one)."""
        return next((self.key_of[n] for n in self.names.get(id(p), []) if n in self.key_of), None)

    def check(self) -> None:
        """Every parameter is in the checkpoint with the model's shape, and every
        persistent buffer the checkpoint holds too: else a :class:`ModelLoadError`
        naming the file and the tensor."""
        cls = type(self.model).__name__
        if self.converted:
            raise ModelLoadError(
                f"{self.ckpt.where[self.converted[0]]}: tensor {self.converted[0]} is stored in "
                f"a layout transformers converts as it loads {cls} (not a rename): "
                "tnsurgery cannot stream this checkpoint"
            )
        for names in self.names.values():
            key = next((self.key_of[n] for n in names if n in self.key_of), None)
            if key is None:
                raise ModelLoadError(
                    f"{self.ckpt.directory}: the checkpoint has no tensor for {names[0]} of "
                    f"{cls}: is 'architectures' in config.json the model these weights belong to?"
                )
        # (every parameter, tied ones under each name, and the persistent buffers)
        for name, t in self.model.state_dict(keep_vars=True).items():
            key = self.key_of.get(name)
            if key is None:
                continue
            shape = self.ckpt.header[key].shape
            if tuple(shape) != tuple(t.shape):
                raise ModelLoadError(
                    f"{self.ckpt.where[key]}: tensor {key} has the shape {list(shape)}, where "
                    f"{cls} built from config.json has {list(t.shape)}: refused"
                )
            if self.ckpt.dtype(key) is None:
                raise ModelLoadError(
                    f"{self.ckpt.where[key]}: tensor {key} is stored as "
                    f"{self.ckpt.header[key].dtype}, which tnsurgery does not read"
                )

    def fill(self, modules: list[tuple[str, nn.Module]], device: torch.device | str) -> None:
        """Read the parameters (and persistent buffers the checkpoint holds) of each
        ``(name, module)`` — its own tensors, not its children's — onto ``device``, in
        their stored dtype; a tied parameter read once is shared."""
        for mname, m in modules:
            for pname, p in list(m._parameters.items()):
                if p is None:
                    continue
                if id(p) in self.filled:
                    m._parameters[pname] = self.filled[id(p)]
                    continue
                if p.device.type != "meta":
                    continue
                key = self.key(p)
                if key is None:  # (check() refused this before any work)
                    raise ModelLoadError(f"{self.ckpt.directory}: no tensor for {mname}.{pname}")
                t = self.ckpt.tensor(key).to(device)
                new = nn.Parameter(t, requires_grad=p.requires_grad and t.is_floating_point())
                self.filled[id(p)] = new
                self.meta_of[id(new)] = p
                self.names.setdefault(id(new), self.names.get(id(p), []))
                m._parameters[pname] = new
            for bname, b in list(m._buffers.items()):
                if b is None:
                    continue
                full = f"{mname}.{bname}" if mname else bname
                key = self.key_of.get(full)
                if key is not None and bname not in m._non_persistent_buffers_set:
                    m._buffers[bname] = self.ckpt.tensor(key).to(device)
                elif b.device != torch.device(device) and b.device.type != "meta":
                    m._buffers[bname] = b.to(device)

    def unfill(self, module: nn.Module) -> None:
        """Put back the meta parameters :meth:`fill` replaced in ``module`` (its
        buffers are kept): the module can be read again later."""
        self.forget(module)  # (while its parameters are still the filled ones)
        for m in module.modules():
            for pname, p in list(m._parameters.items()):
                meta = self.restore.pop(id(p), None) if p is not None else None
                if meta is not None:
                    m._parameters[pname] = meta

    def forget(self, module: nn.Module) -> None:
        """Drop what :meth:`fill` kept of ``module``'s parameters (it is being freed)."""
        ids = {id(p) for p in module.parameters()}
        self.restore = {}
        for k in [k for k, v in self.filled.items() if id(v) in ids]:
            real = self.filled.pop(k)
            self.restore[id(real)] = self.meta_of.pop(id(real))
