"""Weights written as shards while the surgery streams, as Hugging Face lays them out.

:class:`ShardWriter` takes tensors as they are ready and writes a shard each time
the tensors held reach ``max_shard_bytes`` (so it holds at most about one shard of
output), under temporary names inside the output's temporary directory. On
:meth:`ShardWriter.finish` the shards get their final names
(``model-00001-of-00003.safetensors``) and ``model.safetensors.index.json`` is
written; a single shard is ``model.safetensors``, with no index, as
``save_pretrained`` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tnsurgery.io.checkpoint import INDEX_NAME
from tnsurgery.io.files import WEIGHTS_NAME

__all__ = ["DEFAULT_SHARD_BYTES", "ShardWriter"]

DEFAULT_SHARD_BYTES = 5 << 30  # save_pretrained's default ("5GB")


class ShardWriter:
    """Writes tensors into ``directory`` as shards of at most ``max_shard_bytes``
    (a tensor larger than that is a shard of its own)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.metadata: dict[str, str] = {"format": "pt"}
        self.names: set[str] = set()  # every tensor added

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to the CPU, contiguous); writes a shard when full."""
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        """Write the tensors held as one shard."""
        if not self.pending:
            return
        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata=self.metadata)
        self.written.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, give the shards their final names and write the index;
        returns the names of the files written (shards, then the index)."""
        self.flush()
        if not self.written:
            save_file({}, str(self.directory / WEIGHTS_NAME), metadata=self.metadata)
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
