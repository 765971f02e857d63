"""Surgered models on disk, as a ``manifest.json`` + ``.safetensors`` pair: written
atomically (:func:`save`, :func:`save_like_input`) and rebuilt without unpickling
anything (:func:`load`): the manifest's layer configs are replayed on a fresh base
model, then the weights loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from tnsurgery.atomic import atomic_dir, atomic_files
from tnsurgery.errors import ModelLoadError, UserInputError
from tnsurgery.io.files import (
    HF_WEIGHT_SUFFIXES,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    load_state_dict_fitting,
    read_safetensors,
    short,
    sidecar_manifest,
)
from tnsurgery.manifest import MANIFEST_FORMAT, Manifest, Replacement
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.swap import Swaps


def _state_for_safetensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors stored once; ``aliases`` maps the others to it."""
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    return tensors, aliases


def _manifest_for_file(model: nn.Module, weights_name: str, aliases: dict[str, str]) -> dict:
    manifest = Manifest.of(model)
    if manifest is None:
        raise UserInputError("this model was not surgered by tnsurgery (no manifest attached)")
    return {**manifest.to_dict(), "weights": weights_name, "aliases": aliases}


def _write_pair(model: nn.Module, manifest_tmp: Path, weights_tmp: Path, weights_name: str) -> dict:
    tensors, aliases = _state_for_safetensors(model)
    manifest = _manifest_for_file(model, weights_name, aliases)
    compact = json.dumps(manifest, separators=(",", ":"), default=str)
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "tnsurgery_manifest": compact})
    manifest_tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return manifest


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a surgered model as a ``manifest.json`` + ``.safetensors`` pair.

    ``path`` ending in ``.safetensors`` writes that file and
    ``<stem>.manifest.json`` beside it; any other path is a directory that
    receives ``manifest.json`` and ``model.safetensors``. Nothing is pickled:
    :func:`load` rebuilds the model from a fresh base model. Returns the path
    to give to :func:`load`.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        with atomic_files(sidecar_manifest(p), p) as (m_tmp, w_tmp):
            _write_pair(model, m_tmp, w_tmp, p.name)
        return p
    with atomic_dir(p) as tmp:
        _write_pair(model, tmp / MANIFEST_NAME, tmp / WEIGHTS_NAME, WEIGHTS_NAME)
    return p


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_like_input(model: nn.Module, loaded: LoadedModel, out: str | Path) -> list[Path]:
    """Write the surgered model in the same kind as the input, plus its manifest pair.

    - Hugging Face directory -> a directory with the input's config and
      tokenizer files, ``manifest.json`` and ``model.safetensors``;
    - pickled module -> ``OUT`` (pickled), ``OUT-stem.safetensors`` and
      ``OUT-stem.manifest.json``;
    - state dict -> ``OUT`` (state dict) and the same pair;
    - safetensors -> ``OUT`` (``.safetensors`` with the manifest in its
      metadata) and ``OUT-stem.manifest.json``.

    Returns the paths written. Refuses to overwrite the input.
    """
    out = Path(out)
    if _same_path(out, loaded.path) or (
        loaded.path.is_dir() and out.resolve().is_relative_to(loaded.path.resolve())
    ):
        raise UserInputError(f"output {out} would overwrite the input {loaded.path}")
    if loaded.kind == "hf":
        if out.exists() and not (out.is_dir() and (out / MANIFEST_NAME).exists()):
            # the directory is replaced whole: only ever replace an earlier output of ours
            what = "a directory that is not a tnsurgery output" if out.is_dir() else "a file"
            raise UserInputError(f"output {out} exists and is {what}; choose a new directory")
        with atomic_dir(out) as tmp:
            for item in loaded.path.iterdir():
                if (
                    item.is_file()
                    and not item.name.endswith(HF_WEIGHT_SUFFIXES)
                    and item.name != MANIFEST_NAME
                ):
                    shutil.copy2(item, tmp / item.name)
                elif item.is_dir() and not item.name.startswith("."):
                    shutil.copytree(item, tmp / item.name)
            _write_pair(model, tmp / MANIFEST_NAME, tmp / WEIGHTS_NAME, WEIGHTS_NAME)
        return [out]
    if out.is_dir():
        raise UserInputError(f"output {out} is a directory; give a file name")
    manifest_path = sidecar_manifest(out)
    if loaded.kind == "safetensors":
        if out.suffix != ".safetensors":
            raise UserInputError(f"the input is .safetensors: the output must be too, got {out}")
        with atomic_files(manifest_path, out) as (m_tmp, w_tmp):
            _write_pair(model, m_tmp, w_tmp, out.name)
        return [out, manifest_path]
    weights = out.with_name(out.name.rsplit(".", 1)[0] + ".safetensors")
    if _same_path(weights, out):
        raise UserInputError(f"the output of a {loaded.kind} input cannot be .safetensors: {out}")
    with atomic_files(out, manifest_path, weights) as (o_tmp, m_tmp, w_tmp):
        _write_pair(model, m_tmp, w_tmp, weights.name)
        if loaded.kind == "pickle":
            torch.save(model, o_tmp)
        else:
            torch.save(model.state_dict(), o_tmp)
    return [out, manifest_path, weights]


# ------------------------------------------------------------ manifest load


def _find_pair(path: Path) -> tuple[dict, Path]:
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.exists():
            raise ModelLoadError(f"{path}: no {MANIFEST_NAME} in this directory")
    elif path.suffix == ".safetensors":
        manifest_path = sidecar_manifest(path)
        if not manifest_path.exists():
            _, metadata = read_safetensors(path)
            if "tnsurgery_manifest" not in metadata:
                raise ModelLoadError(f"{path}: no tnsurgery manifest beside or inside this file")
            return json.loads(metadata["tnsurgery_manifest"]), path
    elif path.name.endswith(".json"):
        manifest_path = path
    else:
        manifest_path = sidecar_manifest(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{manifest_path}: no such manifest") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest: {short(exc)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ModelLoadError(f"{manifest_path}: not a tnsurgery manifest")
    weights = manifest_path.parent / manifest.get("weights", WEIGHTS_NAME)
    return manifest, weights


def load(path: str | Path, base_model: nn.Module, registry: Registry | None = None) -> nn.Module:
    """Rebuild a surgered model from its manifest + safetensors pair, unpickling nothing.

    Args:
        path: the directory written by :func:`save` (or by ``tnsurgery apply``
            on a Hugging Face model), the ``.safetensors`` file, the
            ``.manifest.json`` file, or the main output file beside them.
        base_model: a fresh instance of the original architecture. It is
            modified in place (its targets replaced by the recorded layers,
            all weights loaded) and returned.
        registry: where the layer classes come from (installed plugins by
            default): only layers that a registered transform declares are
            ever instantiated.

    Raises:
        ModelLoadError: unreadable files, a layer no installed plugin
            provides, or weights that do not fit; ``base_model`` is then left
            as it was.
    """
    raw, weights_path = _find_pair(Path(path))
    manifest, aliases = _parse(raw, Path(path))
    state, _ = read_safetensors(weights_path)
    classes = (registry or get_registry()).layer_classes()
    with Swaps(base_model) as swaps:
        for record in manifest.records():
            for rep in record.replacements:
                _replay(base_model, rep, classes, swaps)
        for alias, target in aliases.items():
            if target in state:
                state[alias] = state[target]
        load_state_dict_fitting(base_model, state, weights_path)
    manifest.attach(base_model)
    return base_model


def _parse(raw: dict, where: Path) -> tuple[Manifest, dict[str, str]]:
    """The typed manifest of a file, and its tensor aliases; a malformed one is a
    :class:`ModelLoadError` naming the file and the field."""
    aliases = raw.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ModelLoadError(f"{where}: malformed manifest: field 'aliases' is not a name map")
    try:
        manifest = Manifest.model_validate(
            {k: v for k, v in raw.items() if k not in ("weights", "aliases")}
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelLoadError(
            f"{where}: malformed manifest: field '{field}': {first['msg']}"
        ) from None
    return manifest, aliases


def _replay(base: nn.Module, rep: Replacement, classes: dict[str, type], swaps: Swaps) -> None:
    name, layer = rep.name, rep.layer
    cls = classes.get(layer)
    if cls is None:
        raise ModelLoadError(
            f"layer {layer} (for {name}, transform '{rep.transform}') is not provided "
            "by any installed plugin: install the plugin that registers that transform"
        )
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = base.get_submodule(parent_name) if parent_name else base
        current = parent._modules[attr]
    except (AttributeError, KeyError):
        raise ModelLoadError(
            f"the base model has no module {name}: is it the right architecture?"
        ) from None
    new = cls.from_config(rep.config, current)
    ref = next(iter(current.parameters()), None) if current is not None else None
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    swaps.swap(name, new)
