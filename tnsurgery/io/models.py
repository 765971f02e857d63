"""Reading a model the user names: a pickled module through PyTorch's ``weights_only``
loader and an allow list (``torch.nn`` modules and the registered layer classes, plus
what the user allows), a state dict or ``.safetensors`` with ``--arch``, a Hugging
Face directory, or a tnsurgery output (its manifest replayed on the architecture)."""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery.errors import ModelLoadError, OutputError
from tnsurgery.io import hf_entry, pairs
from tnsurgery.io.files import (
    HF_WEIGHT_SUFFIXES,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    build_arch,
    cwd_on_path,
    import_name,
    load_state_dict_fitting,
    read_safetensors,
    short,
    sidecar_manifest,
)
from tnsurgery.io.manifests import read_document, read_metadata, validated, verify_files
from tnsurgery.io.outputs import read_own_manifest
from tnsurgery.io.skeleton import hf_class
from tnsurgery.io.streamed import load_surgered
from tnsurgery.manifest import get_manifest
from tnsurgery.pickles import load_weights_only
from tnsurgery.plugins import Registry, get_registry


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


# tnsurgery's modules of layer parts: the module classes a surgered model holds
LAYER_PART_MODULES = ("tnsurgery.quant",)


def _layer_modules() -> set[str]:
    """The modules that define the installed layer classes and their parts (e.g. a QAT
    layer's quantizers): module classes defined there are trusted with them."""
    found = {cls.__module__ for cls in get_registry().layer_classes().values()}
    return found | set(LAYER_PART_MODULES)


# The activation functions torch.nn modules store as attributes (nn.TransformerEncoderLayer
# keeps ``F.relu`` or ``F.gelu``): referenced by a pickle, never called by it (a call of
# anything torch.save does not write is refused by tnsurgery.pickles).
ACTIVATION_FUNCTIONS = frozenset(
    f"torch.nn.functional.{f}"
    for f in ("relu", "gelu", "silu", "tanh", "sigmoid", "elu", "leaky_relu", "mish", "glu")
)


def _default_trust(name: str, obj: Any, layer_modules: set[str]) -> bool:
    """Trusted without a flag: ``torch.nn`` module classes and the installed layer
    classes (with the module classes defined beside them), and the activation
    functions of :data:`ACTIVATION_FUNCTIONS`; no other function."""
    if name in ACTIVATION_FUNCTIONS and callable(obj):
        return True
    if not _is_module_class(obj):
        return False
    return name.startswith("torch.nn.") or obj.__module__ in layer_modules


def _user_allows(name: str, allow_classes: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a.rstrip(".") + ".") for a in allow_classes)


def _from_a_script(name: str) -> bool:
    return "__main__" in name.split(".")


def torch_load_safely(
    path: Path, trust_pickle: bool = False, allow_classes: tuple[str, ...] = ()
) -> Any:
    """``torch.load`` with the weights_only unpickler and tnsurgery's allow list.

    Trusted by default: ``torch.nn`` module classes and the installed plugins' layer
    classes (classes only, and only rebuilt the way ``torch.save`` writes them: a
    pickle that *calls* a module class, to make it allocate, is refused).
    ``allow_classes`` adds classes (exact names or package prefixes), never
    functions. Raises :class:`ModelLoadError` naming what is refused and the
    flags that allow it.
    """
    try:
        return _torch_load(path, trust_pickle, allow_classes)
    except ModelLoadError:
        raise
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: a directory, not a model file") from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot read this file as a PyTorch checkpoint "
            f"(truncated, corrupt or another format): {short(exc)}"
        ) from None


def _torch_load(path: Path, trust_pickle: bool, allow_classes: tuple[str, ...]) -> Any:
    if trust_pickle:
        with cwd_on_path():
            return torch.load(path, map_location="cpu", weights_only=False)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80" and head != b"PK":  # a pickle: torch.save's legacy format
            raise ModelLoadError(
                f"{path}: saved in PyTorch's legacy format (before the zip format of "
                "PyTorch 1.6): tnsurgery reads legacy files only with --trust-pickle; or load "
                "it once and save it again with torch.save"
            ) from None
        raise ModelLoadError(
            f"{path}: cannot read this file as a PyTorch checkpoint (truncated, corrupt or "
            "another format)"
        ) from None
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    plugin_layers = set(get_registry().layer_classes())
    layer_modules = _layer_modules()
    allowed: list[Any] = []
    refused: list[str] = []
    scripts: list[str] = []
    by_user_names: set[str] = set()
    for name in needed:
        # Decide on the name first: a name that is not allowed is never imported
        # (importing runs code, and the checkpoint chose the name).
        if _from_a_script(name):
            scripts.append(name)
            continue
        by_user = _user_allows(name, allow_classes)
        maybe_default = (
            name in plugin_layers
            or name.startswith("torch.nn.")
            or any(name.startswith(m + ".") for m in layer_modules)
        )
        if not (by_user or maybe_default):
            refused.append(name)
            continue
        try:
            with cwd_on_path() if by_user else contextlib.nullcontext():
                obj = import_name(name)
        except ImportError:
            refused.append(f"{name} (cannot be imported)")
            continue
        if maybe_default and _default_trust(name, obj, layer_modules):
            allowed.append(obj)
        elif by_user and isinstance(obj, type):
            allowed.append(obj)
            by_user_names.add(name)
        elif by_user:
            refused.append(f"{name} (a {type(obj).__name__}: --allow-class allows classes only)")
        else:
            refused.append(name)
    if scripts:
        raise ModelLoadError(
            f"{path}: the file needs {', '.join(scripts)}, defined in the script that saved "
            "it (__main__), which cannot be found again: define the class in a module and "
            "save again, or save a state dict (torch.save(model.state_dict(), ...)) and give "
            "--arch pkg.module:factory"
        )
    if refused:
        raise ModelLoadError(
            f"{path}: the file needs classes or functions that are not trusted by default: "
            f"{', '.join(refused)}. If you trust this file, pass --trust-pickle "
            f"(python: trust_pickle=True), or allow just these classes with "
            f"--allow-class NAME for each (python: allow_classes=[...])."
        )
    return load_weights_only(path, path, allowed, frozenset(by_user_names))


# The fewest bytes a parameter of a checkpoint takes (4-bit quantized), and how much
# smaller than its dense model a surgered directory's weights may be.
MIN_PARAM_BYTES = 0.5
MAX_COMPRESSION = 20


def _check_config_size(
    transformers: Any, cls: Any, config: Any, path: Path, surgered: bool
) -> None:
    """Refuse a config.json describing a model far larger than the weights beside it
    (a 12 KB directory must not make tnsurgery build a 2 GB model). The model is built
    on the meta device to count its parameters; when that is not possible, no check."""
    held = sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.is_file() and f.name.endswith(HF_WEIGHT_SUFFIXES)
    )
    try:
        with torch.device("meta"):
            if cls is transformers.AutoModel:
                skeleton = cls.from_config(config, trust_remote_code=False)
            else:
                skeleton = cls(config)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: not measured
        return
    params = sum(p.numel() for p in skeleton.parameters())
    limit = (MAX_COMPRESSION if surgered else 1.1) * held + (64 << 20)
    if params * MIN_PARAM_BYTES > limit:
        raise ModelLoadError(
            f"{path}: config.json describes a model of {params:,} parameters, far more than "
            f"its weight files hold ({held:,} bytes): refused"
        )


def _check_weights_found(model: nn.Module, info: dict, path: Path) -> None:
    """Refuse a directory whose weights mostly do not belong to the class its config
    names (``architectures`` of another model): transformers would initialise most
    of the model at random and only warn."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    missing = sum(params[k].numel() for k in info.get("missing_keys", ()) if k in params)
    if total and missing > total / 2:
        raise ModelLoadError(
            f"{path}: the weight files hold less than half of the parameters of "
            f"{type(model).__name__} ({missing:,} of {total:,} missing): is 'architectures' "
            "in config.json the model these weights belong to?"
        )


def _load_hf(path: Path, registry: Registry | None = None) -> nn.Module:
    try:
        import transformers  # optional dependency (the hf extra)
    except ImportError:
        raise ModelLoadError(
            f"{path} is a Hugging Face model directory: pip install transformers"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # our CLI has its own status line
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        cls = hf_class(config)
        surgered = (path / MANIFEST_NAME).exists()
        _check_config_size(transformers, cls, config, path, surgered)
        if surgered:  # a surgered directory: built from its config, read tensor by tensor
            return load_surgered(path, config, registry)
        extra = {"trust_remote_code": False} if cls is transformers.AutoModel else {}
        model, info = cls.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, **extra
        )
        _check_weights_found(model, info, path)
        return model
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model: {short(exc)}") from None


def load(
    path: str | Path, base_model: nn.Module | None = None, registry: Registry | None = None
) -> nn.Module:
    """Rebuild a surgered model from what tnsurgery wrote, unpickling nothing.

    A Hugging Face output directory (``config.json`` + ``manifest.json``; also its
    ``manifest.json`` or ``model.safetensors`` named directly) needs no
    ``base_model``: its config says which class to build. Every other output (a
    :func:`~tnsurgery.io.pairs.save` directory, a ``.safetensors`` file, the pair
    beside a ``.pt``) is replayed on ``base_model``, a fresh instance of the
    original architecture (see :func:`tnsurgery.io.pairs.load`).

    Raises:
        ModelLoadError: malformed or mismatched files, a layer no installed plugin
            provides, or no ``base_model`` for an output that needs one.
    """
    p = Path(path)
    if base_model is not None:
        return pairs.load(p, base_model, registry)
    directory = p if p.is_dir() else p.parent
    if (p.is_dir() or p.name in (MANIFEST_NAME, WEIGHTS_NAME)) and surgered_hf(directory):
        return _load_hf(directory, registry)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    raise ModelLoadError(
        f"{p} is not a Hugging Face output directory: its config does not say which "
        "architecture to build; pass the base model: tnsurgery.load(path, base_model) "
        "with a fresh instance of the original architecture"
    )


def surgered_hf(directory: Path) -> bool:
    """A Hugging Face directory tnsurgery wrote (a manifest beside its config), or that
    ``save_pretrained`` wrote from one (its config's tnsurgery entry)."""
    config = directory / hf_entry.CONFIG_NAME
    if not config.is_file():
        return False
    if (directory / MANIFEST_NAME).is_file():
        return True
    try:
        return hf_entry.quant_method(config) == hf_entry.QUANT_METHOD
    except OutputError as exc:
        raise ModelLoadError(str(exc)) from None


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
    sources = _sources(p)
    if p.is_dir():
        if (p / "config.json").exists():
            return LoadedModel(_load_hf(p), "hf", p, sources=sources)
        if (p / MANIFEST_NAME).exists():
            if not arch:
                raise ModelLoadError(
                    f"{p} holds a tnsurgery manifest: give --arch pkg.module:factory"
                )
            return LoadedModel(pairs.load(p, build_arch(arch)), "safetensors", p, arch, sources)
        raise ModelLoadError(f"{p}: a directory without config.json is not a model directory")
    if p.suffix == ".safetensors":
        metadata = read_metadata(p)
        if not arch:
            raise ModelLoadError(
                f"{p}: a .safetensors file holds only weights: give the architecture with "
                "--arch pkg.module:factory"
            )
        model = build_arch(arch)
        if "tnsurgery_manifest" in metadata or sidecar_manifest(p).exists():
            return LoadedModel(pairs.load(p, model), "safetensors", p, arch, sources)
        state, _ = read_safetensors(p)
        load_state_dict_fitting(model, state, p)
        return LoadedModel(model, "safetensors", p, arch, sources)
    obj = torch_load_safely(p, trust_pickle, allow)
    if isinstance(obj, nn.Module):
        _check_set(p)  # (a state dict's set is checked by load(), which reads its pair)
        _check_embedded_manifest(obj, p)
        return LoadedModel(obj, "pickle", p, sources=sources)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not arch:
            raise ModelLoadError(
                f"{p} holds a state dict: give the architecture with --arch pkg.module:factory"
            )
        model = build_arch(arch)
        if sidecar_manifest(p).exists():
            state_dict = pairs.load(sidecar_manifest(p), model)
            return LoadedModel(state_dict, "state_dict", p, arch, sources)
        load_state_dict_fitting(model, obj, p)
        return LoadedModel(model, "state_dict", p, arch, sources)
    raise ModelLoadError(
        f"{p} holds a {type(obj).__name__}, not a model or a state dict of tensors"
    )


def _sources(p: Path) -> list[Path]:
    """Every file that defines the model at ``p``: the path itself, and for a file
    its sidecar manifest and the files that manifest names (weights, listed files)."""
    found = [p]
    if p.is_dir():
        return found
    manifest_path = sidecar_manifest(p)
    if manifest_path.exists() or manifest_path.is_symlink():
        found.append(manifest_path)
        data = read_own_manifest(manifest_path) or {}
        names = [data.get("weights"), *(data.get("files") or {})]
        for name in names:
            if isinstance(name, str) and name and "/" not in name and name not in (".", ".."):
                found.append(p.parent / name)
    return found


def _check_embedded_manifest(model: nn.Module, p: Path) -> None:
    """The manifest a pickled model carries is data from the file: validated like a
    manifest file (a malformed one is a ModelLoadError naming the field)."""
    raw = get_manifest(model)
    if raw is not None:
        validated(raw, f"{p} (the manifest the model carries)")


def _check_set(p: Path) -> None:
    """A pickled output whose sidecar manifest lists it must match it: a set that an
    interrupted write left mixed is refused."""
    manifest_path = sidecar_manifest(p)
    data = read_own_manifest(manifest_path)
    if data is not None and isinstance(data.get("files"), dict) and p.name in data["files"]:
        verify_files(read_document(manifest_path))
