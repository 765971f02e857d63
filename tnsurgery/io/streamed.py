"""A surgered Hugging Face directory loaded without a base model, tensor by tensor.

The architecture comes from ``config.json`` (:mod:`tnsurgery.io.skeleton`, every
parameter on the meta device); the manifest is validated and the output set's
sizes and hashes checked; the recorded layers are replayed on the meta model after
the dry run against the shards' headers (:func:`tnsurgery.io.pairs.replay`); then
each tensor is read from its shard into place (:mod:`tnsurgery.io.checkpoint`): the
model is never built twice, nor initialised, and a sharded output loads as a single
file does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery.io import hf_quantizer
from tnsurgery.io.checkpoint import Checkpoint, Weights
from tnsurgery.io.manifests import read_document, verify_files
from tnsurgery.io.pairs import replay
from tnsurgery.io.skeleton import empty_model
from tnsurgery.plugins import Registry, get_registry

__all__ = ["load_surgered"]


def load_surgered(
    directory: Path,
    config: Any = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The surgered model of ``directory`` (``config.json`` + ``manifest.json`` + the
    weights, one file or shards with their index), in eval mode, on ``device``.

    Raises:
        ModelLoadError: a malformed manifest or index, a missing, truncated or
            changed file of the output set, a layer no installed plugin provides,
            weights that do not fit the recorded layers.
    """
    doc = read_document(Path(directory))
    verify_files(doc)
    classes = (registry or get_registry()).layer_classes()
    reps = [rep for record in doc.manifest.records() for rep in record.replacements]
    with Checkpoint.open(Path(directory)) as ckpt:
        model = empty_model(Path(directory), config)
        replay(model, reps, classes, doc, ckpt.header, hf_quantizer.build_on_meta)
        weights = Weights(model, ckpt)
        for alias, target in doc.aliases.items():
            if target in weights.key_of and alias not in weights.key_of:
                weights.key_of[alias] = weights.key_of[target]
        weights.check()
        weights.fill(list(model.named_modules(remove_duplicate=False)), device)
    doc.manifest.attach(model)
    hf_quantizer.attach(model)  # save_pretrained writes a directory that loads
    return model.eval()
