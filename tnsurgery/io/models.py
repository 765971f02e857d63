"""Reading a model the user names: a pickled module through PyTorch's ``weights_only``
loader and an allow list (``torch.nn`` modules and the registered layer classes, plus
what the user allows), a state dict or ``.safetensors`` with ``--arch``, a Hugging
Face directory, or a tnsurgery output (its manifest replayed on the architecture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery.errors import ModelLoadError
from tnsurgery.io.files import (
    MANIFEST_NAME,
    LoadedModel,
    build_arch,
    cwd_on_path,
    import_name,
    load_state_dict_fitting,
    read_safetensors,
    short,
    sidecar_manifest,
)
from tnsurgery.io.pairs import load
from tnsurgery.plugins import get_registry

TRUSTED_PREFIXES = ("torch.nn.", "tnsurgery.")


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
            f"(truncated, corrupt or another format): {short(exc)}"
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
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model: {short(exc)}") from None


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
        state, metadata = read_safetensors(p)
        if not arch:
            raise ModelLoadError(
                f"{p}: a .safetensors file holds only weights: give the architecture with "
                "--arch pkg.module:factory"
            )
        model = build_arch(arch)
        if "tnsurgery_manifest" in metadata or sidecar_manifest(p).exists():
            return LoadedModel(load(p, model), "safetensors", p, arch)
        load_state_dict_fitting(model, state, p)
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
        if sidecar_manifest(p).exists():
            return LoadedModel(load(sidecar_manifest(p), model), "state_dict", p, arch)
        load_state_dict_fitting(model, obj, p)
        return LoadedModel(model, "state_dict", p, arch)
    raise ModelLoadError(
        f"{p} holds a {type(obj).__name__}, not a model or a state dict of tensors"
    )
