"""What makes a surgered Hugging Face directory load where users load models.

``tnsurgery apply`` on a Hugging Face directory writes, into the output's
``config.json``, a ``quantization_config`` entry with ``"quant_method":
"tnsurgery"``: the replacements to replay (module name, layer class, layer config,
oldest first), the *guards* and the aliases of the weights file. transformers reads
it through the quantizer that :mod:`tnsurgery.io.hf_quantizer` registers (once
``tnsurgery`` is imported), which replays the replacements before the weights load.

Without tnsurgery, transformers skips an unknown ``quant_method`` with a warning
and would fill every surgered layer with random weights. The guards prevent that:
for each surgered module ``X`` whose original ``X.weight`` the surgered model no
longer holds, the weights file stores an empty tensor under ``X.weight``. The plain
architecture expects a full ``X.weight`` there, so transformers refuses the
checkpoint (a size mismatch) instead of initialising it at random; tnsurgery's
loaders drop the guards. Nothing here imports transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tnsurgery._version import __version__
from tnsurgery.errors import ModelLoadError, OutputError
from tnsurgery.io.files import MAX_MANIFEST_BYTES, short
from tnsurgery.io.manifests import Document, TensorInfo, shape_problem
from tnsurgery.manifest import Manifest, Replacement

QUANT_METHOD = "tnsurgery"
ENTRY_VERSION = 1  # the newest entry format this tnsurgery reads and writes
CONFIG_NAME = "config.json"
ENTRY_FIELDS = ("name", "layer", "transform", "config")  # what a replayed record keeps


@dataclass
class Entry:
    """A validated ``quantization_config`` entry of a surgered directory."""

    replacements: list[Replacement]
    guards: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)


def guard_names(model: nn.Module, manifest: Manifest, keys: set[str]) -> list[str]:
    """``X.weight`` for each surgered module ``X`` of ``model`` whose state (``keys``)
    no longer holds that tensor: the names the weights file guards."""
    modules = dict(model.named_modules())
    names = [n for n in manifest.surgered_names() if n in modules]
    return [f"{n}.weight" for n in names if f"{n}.weight" not in keys]


def guard_tensor() -> torch.Tensor:
    """What a guard stores: an empty tensor (no architecture has an empty weight)."""
    return torch.zeros(0)


def entry(manifest: Manifest, guards: list[str], aliases: dict[str, str]) -> dict[str, Any]:
    """The ``quantization_config`` of a surgered directory: every recorded replacement,
    oldest first (what :func:`tnsurgery.load` replays), the guards and the aliases."""
    reps = [
        rep.model_dump(mode="json", include=set(ENTRY_FIELDS))
        for record in manifest.records()
        for rep in record.replacements
    ]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": ENTRY_VERSION,
        "tnsurgery_version": __version__,
        "replacements": reps,
        "guards": list(guards),
        "aliases": dict(aliases),
    }


def _read_config(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise OutputError(f"{path}: a config.json larger than {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise OutputError(f"{path}: cannot read config.json: {short(exc)}") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: config.json does not hold an object")
    return data


def quant_method(config_path: Path) -> str | None:
    """The ``quant_method`` of a ``config.json``'s ``quantization_config`` (``None``
    when it has none; ``"unknown"`` for an entry without one)."""
    if not config_path.is_file():
        return None
    qc = _read_config(config_path).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method or "unknown")


def foreign_quantization(config_path: Path) -> str | None:
    """The ``quant_method`` of a ``config.json`` quantized by another method (gptq,
    bitsandbytes...), which a tnsurgery entry cannot sit beside; ``None`` if none."""
    method = quant_method(config_path)
    return None if method == QUANT_METHOD else method


def write_config(path: Path, value: dict[str, Any]) -> None:
    """Set the ``quantization_config`` of the ``config.json`` at ``path`` to ``value``
    (an earlier tnsurgery entry is replaced: ``value`` holds the whole history)."""
    data = _read_config(path)
    data["quantization_config"] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", "utf-8")


def read_entry(raw: Any, where: Path) -> Entry:
    """Validate a ``quantization_config`` entry (untrusted data from ``config.json``):
    its size and nesting, version, and every replacement record; a defect is a
    :class:`ModelLoadError` naming ``where`` and the field."""
    field_ = "quantization_config"
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        raise ModelLoadError(f"{where}: field '{field_}' is not a tnsurgery entry")
    problem = shape_problem(raw)
    if problem:
        raise ModelLoadError(f"{where}: malformed field '{field_}': {problem}")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelLoadError(f"{where}: malformed field '{field_}.format_version': {version!r}")
    if version > ENTRY_VERSION:
        raise ModelLoadError(
            f"{where}: '{field_}' format_version {version} was written by a newer tnsurgery "
            f"(this one reads up to {ENTRY_VERSION}): upgrade tnsurgery"
        )
    records = raw.get("replacements")
    if not isinstance(records, list) or not records:
        raise ModelLoadError(f"{where}: malformed field '{field_}.replacements': not a list")
    reps = []
    for i, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError("not an object")
            reps.append(
                Replacement.model_validate({k: record[k] for k in ENTRY_FIELDS if k in record})
            )
        except (ValidationError, ValueError, RecursionError) as exc:
            detail = exc.errors(include_url=False)[0] if isinstance(exc, ValidationError) else None
            sub = "." + ".".join(str(p) for p in detail["loc"]) if detail else ""
            msg = detail["msg"] if detail else short(exc)
            raise ModelLoadError(
                f"{where}: malformed field '{field_}.replacements[{i}]{sub}': {msg}"
            ) from None
    guards = raw.get("guards") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise ModelLoadError(f"{where}: malformed field '{field_}.guards': not a list of names")
    aliases = raw.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ModelLoadError(f"{where}: malformed field '{field_}.aliases': not a name map")
    return Entry(reps, guards, aliases)


def check_guards(doc: Document, header: dict[str, TensorInfo]) -> None:
    """A guard names an empty tensor of the weights file, nothing else."""
    for guard in doc.guards:
        if guard in header and header[guard].numel:
            raise ModelLoadError(
                f"{doc.where}: field '{doc.prefix}guards' names {guard}, a tensor of "
                f"{doc.weights.name} that is not empty: refused"
            )
