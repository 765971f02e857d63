"""Weights written as shards while the surgery streams, as Hugging Face lays them out.

:class:`ShardWriter` takes tensors as they are ready and writes each one to disk at
once, so a streamed surgery holds no output in memory: only the block it works on.
A safetensors file starts with a header naming every tensor and its offsets, which
is known only when the shard is complete; so the tensors' bytes go to spool files
beside it (one per element size), and when the tensors written reach
``max_shard_bytes`` the shard is made: the header, then the spools copied after it
(the largest elements first, so every tensor stays aligned to its element size, as
``safetensors.torch.save_file`` aligns them). Everything is written under temporary
names inside the output's temporary directory. On :meth:`ShardWriter.finish` the
shards get their final names (``model-00001-of-00003.safetensors``) and
``model.safetensors.index.json`` is written; a single shard is
``model.safetensors``, with no index, as ``save_pretrained`` writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from tnsurgery.io.checkpoint import INDEX_NAME
from tnsurgery.io.files import WEIGHTS_NAME
from tnsurgery.io.manifests import SAFETENSORS_DTYPES

__all__ = ["DEFAULT_SHARD_BYTES", "SAFETENSORS_DTYPES", "ShardWriter"]

DEFAULT_SHARD_BYTES = 5 << 30  # save_pretrained's default ("5GB")

_COPY_CHUNK = 16 << 20


class ShardWriter:
    """Writes tensors into ``directory`` as shards of at most ``max_shard_bytes``
    (a tensor larger than that is a shard of its own), each tensor's bytes on disk as
    soon as it is added."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.written: list[tuple[Path, list[str]]] = []  # shards made: path, tensor names
        self.total_bytes = 0
        self.metadata: dict[str, str] = {"format": "pt"}
        self.names: set[str] = set()  # every tensor added
        # the shard being filled: per element size, its spool file and its tensors
        self._spools: dict[int, tuple[BinaryIO, Path]] = {}
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}
        self.pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes (copied to the CPU, contiguous) to the shard being
        filled; the shard is made first when this tensor would overflow it."""
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        tag = SAFETENSORS_DTYPES.get(tensor.dtype)
        if tag is None:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        self.names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self.pending_bytes and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        t = tensor.detach().to("cpu").contiguous()
        width = t.element_size()
        if width not in self._spools:
            path = self.directory / f".shard-{len(self.written) + 1:05d}.spool{width}"
            self._spools[width] = (open(path, "wb"), path)  # noqa: SIM115 - closed in flush
            self._entries[width] = []
        f, _ = self._spools[width]
        if size:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[width].append((name, tag, list(t.shape), size))
        self.pending_bytes += size

    def flush(self) -> None:
        """Make the shard from the tensors written since the last one: its header, then
        its spools (largest elements first), then the spools are removed."""
        if not self._entries:
            return
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        order = sorted(self._entries, reverse=True)
        names: list[str] = []
        for width in order:
            for name, tag, shape, size in self._entries[width]:
                header[name] = {
                    "dtype": tag,
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
                names.append(name)
        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        try:
            with open(path, "wb") as out:
                out.write(_header_bytes(header))
                for width in order:
                    f, spool = self._spools[width]
                    f.close()
                    with open(spool, "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
            self.written.append((path, names))
            self.total_bytes += self.pending_bytes
        finally:
            self.close()  # the spools, made into the shard or not

    def close(self) -> None:
        """Drop the shard being filled (its spools): after :meth:`flush` made it, or
        after a failure."""
        for f, spool in self._spools.values():
            f.close()
            spool.unlink(missing_ok=True)
        self._spools, self._entries, self.pending_bytes = {}, {}, 0

    def finish(self) -> list[str]:
        """Make the last shard, give the shards their final names and write the index;
        returns the names of the files written (shards, then the index)."""
        self.flush()
        if not self.written:
            (self.directory / WEIGHTS_NAME).write_bytes(
                _header_bytes({"__metadata__": self.metadata})
            )
            return [WEIGHTS_NAME]
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.directory / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        n = len(self.written)
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, tensors) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")
        return [*names, INDEX_NAME]


def _header_bytes(header: dict[str, object]) -> bytes:
    """A safetensors file's start: the header's length (8 bytes, little-endian), then the
    header as JSON padded with spaces so that the data starts 8-byte aligned."""
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
