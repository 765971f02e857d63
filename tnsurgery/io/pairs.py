"""Surgered models on disk, as a ``manifest.json`` + ``.safetensors`` pair: written
atomically (:func:`save`, :func:`save_like_input`) and rebuilt without unpickling
anything (:func:`load`): the manifest's layer configs are replayed on a fresh base
model, then the weights loaded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tnsurgery.atomic import atomic_dir, atomic_files
from tnsurgery.errors import ModelLoadError, OutputError, UserInputError
from tnsurgery.io import hf_entry
from tnsurgery.io.dry_run import check_aliases, dry_run, place
from tnsurgery.io.files import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    load_state_dict_fitting,
    read_safetensors,
    short,
    sidecar_manifest,
)
from tnsurgery.io.manifests import Document, TensorInfo, read_document, read_header, verify_files
from tnsurgery.io.outputs import (
    check_apart,
    check_replaceable_dir,
    check_replaceable_files,
    copy_input_dir,
    file_records,
)
from tnsurgery.manifest import Manifest, Replacement
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


def _write_set(
    model: nn.Module,
    manifest_tmp: Path,
    weights_tmp: Path,
    weights_name: str,
    main: tuple[Path, str, str] | None = None,
    hf_config: Path | None = None,
) -> dict:
    """Write the weights (and the ``main`` file: ``(tmp, name, "pickle" | "state_dict")``),
    then the manifest, which lists every file of the set with its size and SHA-256.

    ``hf_config``: the ``config.json`` of a Hugging Face output, which receives the
    ``quantization_config`` entry of :mod:`tnsurgery.io.hf_entry`; the weights file
    then holds its guards."""
    tensors, aliases = _state_for_safetensors(model)
    manifest = _manifest_for_file(model, weights_name, aliases)
    files = {weights_name: weights_tmp}
    if hf_config is not None:
        typed = Manifest.of(model)
        guards = hf_entry.guard_names(model, typed, set(tensors) | set(aliases))
        tensors.update({g: hf_entry.guard_tensor() for g in guards})
        manifest["guards"] = guards
        # (config.json is not listed: users edit configs, and tnsurgery.load replays
        # this manifest, not the entry)
        hf_entry.write_config(hf_config, hf_entry.entry(typed, guards, aliases))
    compact = json.dumps(manifest, separators=(",", ":"), default=str)
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "tnsurgery_manifest": compact})
    if main is not None:
        tmp, name, kind = main
        torch.save(model if kind == "pickle" else model.state_dict(), tmp)
        files[name] = tmp
    manifest["files"] = file_records(files)
    manifest_tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return manifest


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a surgered model as a ``manifest.json`` + ``.safetensors`` pair.

    ``path`` ending in ``.safetensors`` writes that file and
    ``<stem>.manifest.json`` beside it; any other path is a directory that
    receives ``manifest.json`` and ``model.safetensors``. Nothing is pickled:
    :func:`load` rebuilds the model from a fresh base model. Returns the path
    to give to :func:`load`.

    An existing ``path`` is replaced only if it is an earlier tnsurgery output;
    anything else there is an :class:`~tnsurgery.errors.OutputError` and is left
    alone. The pair appears whole or not at all.
    """
    p = _named(path)
    if p.suffix == ".safetensors":
        manifest_path = sidecar_manifest(p)
        check_replaceable_files([p, manifest_path], manifest_path)
        with atomic_files(p, manifest_path) as (w_tmp, m_tmp):
            _write_set(model, m_tmp, w_tmp, p.name)
        return p
    check_replaceable_dir(p)
    with atomic_dir(p) as tmp:
        _write_set(model, tmp / MANIFEST_NAME, tmp / WEIGHTS_NAME, WEIGHTS_NAME)
    return p


def _named(out: str | Path) -> Path:
    """``out`` with a name of its own (``.``, ``..`` resolved)."""
    out = Path(out)
    return out.resolve() if out.name in ("", ".", "..") else out


def output_set(loaded: LoadedModel, out: str | Path) -> list[Path]:
    """Every path ``save_like_input(model, loaded, out)`` creates or replaces."""
    out = _named(out)
    if loaded.kind == "hf":
        return [out]
    manifest_path = sidecar_manifest(out)
    if loaded.kind == "safetensors":
        return [out, manifest_path]
    return [out, out.with_name(out.name.rsplit(".", 1)[0] + ".safetensors"), manifest_path]


def check_output(loaded: LoadedModel, out: str | Path, protect: Iterable[Path] = ()) -> list[Path]:
    """Check, before any work, that ``save_like_input(model, loaded, out)`` may write:
    the output set is apart from the input's files (and ``protect``), and every
    existing path in it is an earlier tnsurgery output. Returns the output set.

    Raises:
        OutputError: with what is in the way and what to do.
    """
    out = _named(out)
    targets = output_set(loaded, out)
    check_apart(targets, [*loaded.sources, *protect])
    if loaded.kind == "hf":
        method = hf_entry.foreign_quantization(loaded.path / hf_entry.CONFIG_NAME)
        if method is not None:
            raise OutputError(
                f"{loaded.path} is quantized with '{method}' (its config.json): tnsurgery "
                "cannot write a surgered model loadable from that format; dequantize it first"
            )
        check_replaceable_dir(out)
        return targets
    if loaded.kind == "safetensors" and out.suffix != ".safetensors":
        raise OutputError(f"the input is .safetensors: the output must be too, got {out}")
    if loaded.kind != "safetensors" and targets[1] == out:
        raise OutputError(f"the output of a {loaded.kind} input cannot be .safetensors: {out}")
    check_replaceable_files(targets, targets[-1])
    return targets


def save_like_input(
    model: nn.Module, loaded: LoadedModel, out: str | Path, protect: Iterable[Path] = ()
) -> list[Path]:
    """Write the surgered model in the same kind as the input, plus its manifest pair.

    - Hugging Face directory -> a directory with the input's config and
      tokenizer files, ``manifest.json`` and ``model.safetensors``; its
      ``config.json`` gains the ``quantization_config`` entry that makes
      ``from_pretrained`` rebuild the surgered layers (:mod:`tnsurgery.io.hf_entry`);
    - pickled module -> ``OUT`` (pickled), ``OUT-stem.safetensors`` and
      ``OUT-stem.manifest.json``;
    - state dict -> ``OUT`` (state dict) and the same pair;
    - safetensors -> ``OUT`` (``.safetensors`` with the manifest in its
      metadata) and ``OUT-stem.manifest.json``.

    The manifest is written last and lists every other file with its size and
    SHA-256, so a set an interruption left mixed is refused when read. Returns the
    paths written.

    Raises:
        OutputError: the output set would touch a file that defines the input
            (or one of ``protect``, e.g. the teacher), or an existing path that is
            not an earlier tnsurgery output; or the system refused the write.
    """
    out = _named(out)
    targets = check_output(loaded, out, protect)
    if loaded.kind == "hf":
        with atomic_dir(out) as tmp:
            copy_input_dir(loaded.path, tmp)
            config = tmp / hf_entry.CONFIG_NAME
            _write_set(
                model, tmp / MANIFEST_NAME, tmp / WEIGHTS_NAME, WEIGHTS_NAME, hf_config=config
            )
        return [out]
    manifest_path = targets[-1]
    if loaded.kind == "safetensors":
        with atomic_files(out, manifest_path) as (w_tmp, m_tmp):
            _write_set(model, m_tmp, w_tmp, out.name)
        return [out, manifest_path]
    weights = targets[1]
    with atomic_files(out, weights, manifest_path) as (o_tmp, w_tmp, m_tmp):
        _write_set(model, m_tmp, w_tmp, weights.name, (o_tmp, out.name, loaded.kind))
    return [out, manifest_path, weights]


# ------------------------------------------------------------ manifest load


def load(path: str | Path, base_model: nn.Module, registry: Registry | None = None) -> nn.Module:
    """Rebuild a surgered model from its manifest + safetensors pair, unpickling nothing.

    The manifest is validated first (:mod:`tnsurgery.io.manifests`): its format,
    every field, the weights file confined to its directory, the output set's
    sizes and hashes. Each recorded layer is then built on the meta device and
    checked against the weights file before it is built for real, so no config
    can make tnsurgery allocate more than the file holds.

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
        ModelLoadError: unreadable or malformed files (naming the file and the
            field), a layer no installed plugin provides, or weights that do
            not fit; ``base_model`` is then left as it was.
    """
    doc = read_document(Path(path))
    verify_files(doc)
    header = read_header(doc.weights)
    classes = (registry or get_registry()).layer_classes()
    reps = [rep for record in doc.manifest.records() for rep in record.replacements]
    check_before_building(base_model, reps, classes, doc, header)
    with Swaps(base_model) as swaps:
        swap_in(swaps, base_model, reps, classes, doc)
        state, _ = read_safetensors(doc.weights)
        for guard in doc.guards:
            state.pop(guard, None)
        for alias, target in doc.aliases.items():
            if target in state:
                state[alias] = state[target]
        load_state_dict_fitting(base_model, state, doc.weights)
    doc.manifest.attach(base_model)
    return base_model


def replay(
    base: nn.Module,
    reps: list[Replacement],
    classes: dict[str, type],
    doc: Document,
    header: dict[str, TensorInfo],
    build: Build | None = None,
) -> None:
    """Put the recorded layers in ``base`` (no weights loaded), after the checks of
    :func:`check_before_building`; all or nothing. ``build(cls, config, current)``
    makes each layer (``cls.from_config`` by default)."""
    check_before_building(base, reps, classes, doc, header)
    with Swaps(base) as swaps:
        swap_in(swaps, base, reps, classes, doc, build)


def check_before_building(
    base: nn.Module,
    reps: list[Replacement],
    classes: dict[str, type],
    doc: Document,
    header: dict[str, TensorInfo],
) -> None:
    """Every check made before a recorded layer is built, by every loader: the guards
    and aliases against the header, then the dry run on the meta device
    (:func:`tnsurgery.io.dry_run.dry_run`)."""
    hf_entry.check_guards(doc, header)
    check_aliases(doc, header)
    dry_run(base, reps, classes, doc, header)


Build = Callable[[type, dict, "nn.Module | None"], nn.Module]


def swap_in(
    swaps: Swaps,
    base: nn.Module,
    reps: list[Replacement],
    classes: dict[str, type],
    doc: Document,
    build: Build | None = None,
) -> None:
    """Build each recorded layer (in the dtype and on the device of the module at its
    place) and swap it in through ``swaps``."""
    for i, rep in enumerate(reps):
        cls, current = place(base, rep, classes, doc, i)
        try:
            new = build(cls, rep.config, current) if build else cls.from_config(rep.config, current)
        except Exception as exc:
            raise ModelLoadError(
                f"{doc.where}: malformed {doc.what}: field '{doc.prefix}replacements[{i}].config' "
                f"of {rep.name}: {short(exc)}"
            ) from None
        ref = next(iter(current.parameters()), None) if current is not None else None
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        swaps.swap(rep.name, new)
