"""Safe loading, manifest + safetensors pairs, atomic writes.

Reading: a pickled module is loaded with PyTorch's ``weights_only`` loader,
which only rebuilds classes on an allow list: ``torch.nn`` modules and
tnsurgery's own layers, plus what the user names (``allow_classes``) or
everything when the file is trusted (``trust_pickle``). State dicts and
``.safetensors`` need the architecture (``arch``, ``pkg.module:factory``);
Hugging Face model directories are read with transformers.

Writing: every output is written to a temporary name beside its target and
renamed into place only when all of it was written, so a failure never
leaves a partial file, and an input is never overwritten.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tnsurgery.atomic import atomic_dir, atomic_files
from tnsurgery.errors import ModelLoadError, UserInputError
from tnsurgery.manifest import MANIFEST_ATTR, MANIFEST_FORMAT, get_manifest
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.swap import Swaps

TRUSTED_PREFIXES = ("torch.nn.", "tnsurgery.")
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


@dataclass
class LoadedModel:
    """A model read from disk, with what is needed to write it back in the same kind.

    ``kind`` is ``"pickle"``, ``"state_dict"``, ``"safetensors"`` or ``"hf"``.
    """

    model: nn.Module
    kind: str
    path: Path
    arch: str | None = None


# ----------------------------------------------------------------- reading


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


def _trusted_by_default(name: str, obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    return name.startswith(TRUSTED_PREFIXES) and (
        issubclass(obj, nn.Module) or name.startswith("tnsurgery.")
    )


def _user_allows(name: str, allow_classes: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a.rstrip(".") + ".") for a in allow_classes)


def torch_load_safely(
    path: Path, trust_pickle: bool = False, allow_classes: tuple[str, ...] = ()
) -> Any:
    """``torch.load`` with the weights_only unpickler and tnsurgery's allow list.

    Raises :class:`ModelLoadError` naming the classes a file needs that are
    not allowed, and the flags that allow them.
    """
    try:
        with cwd_on_path():
            return _torch_load(path, trust_pickle, allow_classes)
    except ModelLoadError:
        raise
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot read this file as a PyTorch checkpoint "
            f"(truncated, corrupt or another format): {_short(exc)}"
        ) from None


def _torch_load(path: Path, trust_pickle: bool, allow_classes: tuple[str, ...]) -> Any:
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    plugin_layers = set(get_registry().layer_classes())  # what tnsurgery.load trusts too
    allowed, refused = [], []
    for name in needed:
        # Decide on the name first: a name that is not allowed is never imported
        # (importing runs code, and the checkpoint chose the name).
        by_user = _user_allows(name, allow_classes)
        if not (by_user or name in plugin_layers or name.startswith(TRUSTED_PREFIXES)):
            refused.append(name)
            continue
        try:
            obj = import_name(name)
        except ImportError:
            refused.append(f"{name} (cannot be imported)")
            continue
        if by_user or name in plugin_layers or _trusted_by_default(name, obj):
            allowed.append(obj)
        else:
            refused.append(name)
    if refused:
        raise ModelLoadError(
            f"{path}: the file needs classes or functions that are not trusted by default: "
            f"{', '.join(refused)}. If you trust this file, pass --trust-pickle "
            f"(python: trust_pickle=True), or allow just these with "
            f"--allow-class NAME for each (python: allow_classes=[...])."
        )
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _short(exc: BaseException) -> str:
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
        raise UserInputError(f"--arch {arch}: cannot import: {_short(exc)}") from None
    try:
        model = factory()
    except Exception as exc:
        raise UserInputError(f"--arch {arch}: the factory failed: {_short(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path}: cannot read this .safetensors file (truncated or corrupt): {_short(exc)}"
        ) from None


def _hf_class(config: Any) -> Any:
    import transformers  # optional dependency (the hf extra)

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_hf(path: Path) -> nn.Module:
    try:
        import transformers  # optional dependency (the hf extra)
    except ImportError:
        raise ModelLoadError(
            f"{path} is a Hugging Face model directory: pip install transformers"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # our CLI has its own status line
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = _hf_class(config)
        if (path / MANIFEST_NAME).exists():  # a surgered directory: base from config
            base = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
            return load(path, base).eval()  # as from_pretrained returns it
        return cls.from_pretrained(str(path), local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model: {_short(exc)}") from None


def load_model(
    path: str | Path,
    arch: str | None = None,
    trust_pickle: bool = False,
    allow_classes: tuple[str, ...] | list[str] = (),
) -> LoadedModel:
    """Read a model from a file or Hugging Face directory, safely.

    Accepts a pickled module (``torch.save(model)``), a state dict
    (``.pt``/``.pth``/``.bin``) or ``.safetensors`` with ``arch``, a Hugging
    Face directory (``config.json``), and tnsurgery's own outputs (their
    manifest is replayed on the base architecture).
    """
    p = Path(path)
    allow = tuple(allow_classes)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "config.json").exists():
            return LoadedModel(_load_hf(p), "hf", p)
        if (p / MANIFEST_NAME).exists():
            if not arch:
                raise ModelLoadError(
                    f"{p} holds a tnsurgery manifest: give --arch pkg.module:factory"
                )
            return LoadedModel(load(p, build_arch(arch)), "safetensors", p, arch)
        raise ModelLoadError(f"{p}: a directory without config.json is not a model directory")
    if p.suffix == ".safetensors":
        state, metadata = _read_safetensors(p)
        if not arch:
            raise ModelLoadError(
                f"{p}: a .safetensors file holds only weights: give the architecture with "
                "--arch pkg.module:factory"
            )
        model = build_arch(arch)
        if "tnsurgery_manifest" in metadata or _sidecar_manifest(p).exists():
            return LoadedModel(load(p, model), "safetensors", p, arch)
        _load_state_dict(model, state, p)
        return LoadedModel(model, "safetensors", p, arch)
    obj = torch_load_safely(p, trust_pickle, allow)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickle", p)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not arch:
            raise ModelLoadError(
                f"{p} holds a state dict: give the architecture with --arch pkg.module:factory"
            )
        model = build_arch(arch)
        if _sidecar_manifest(p).exists():
            return LoadedModel(load(_sidecar_manifest(p), model), "state_dict", p, arch)
        _load_state_dict(model, obj, p)
        return LoadedModel(model, "state_dict", p, arch)
    raise ModelLoadError(
        f"{p} holds a {type(obj).__name__}, not a model or a state dict of tensors"
    )


# ----------------------------------------------------------------- writing


def _sidecar_manifest(path: Path) -> Path:
    return path.with_name(path.name.rsplit(".", 1)[0] + ".manifest.json")


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
    manifest = get_manifest(model)
    if manifest is None:
        raise UserInputError("this model was not surgered by tnsurgery (no manifest attached)")
    return {**manifest, "weights": weights_name, "aliases": aliases}


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
        with atomic_files(_sidecar_manifest(p), p) as (m_tmp, w_tmp):
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
    manifest_path = _sidecar_manifest(out)
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
        manifest_path = _sidecar_manifest(path)
        if not manifest_path.exists():
            _, metadata = _read_safetensors(path)
            if "tnsurgery_manifest" not in metadata:
                raise ModelLoadError(f"{path}: no tnsurgery manifest beside or inside this file")
            return json.loads(metadata["tnsurgery_manifest"]), path
    elif path.name.endswith(".json"):
        manifest_path = path
    else:
        manifest_path = _sidecar_manifest(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{manifest_path}: no such manifest") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest: {_short(exc)}") from None
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
    manifest, weights_path = _find_pair(Path(path))
    state, _ = _read_safetensors(weights_path)
    classes = (registry or get_registry()).layer_classes()
    with Swaps(base_model) as swaps:
        for record in [*manifest.get("history", []), manifest]:
            for rep in record.get("replacements", []):
                _replay(base_model, rep, classes, swaps)
        for alias, target in manifest.get("aliases", {}).items():
            if target in state:
                state[alias] = state[target]
        _load_state_dict(base_model, state, weights_path)
    object.__setattr__(
        base_model,
        MANIFEST_ATTR,
        {k: v for k, v in manifest.items() if k not in ("weights", "aliases")},
    )
    return base_model


def _replay(base: nn.Module, rep: dict, classes: dict[str, type], swaps: Swaps) -> None:
    name, layer = rep["name"], rep["layer"]
    cls = classes.get(layer)
    if cls is None:
        raise ModelLoadError(
            f"layer {layer} (for {name}, transform '{rep.get('transform')}') is not provided "
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
    new = cls.from_config(rep["config"], current)
    ref = next(iter(current.parameters()), None) if current is not None else None
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    swaps.swap(name, new)
