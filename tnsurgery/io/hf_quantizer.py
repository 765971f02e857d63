"""transformers loads surgered directories: a quantizer registered as ``tnsurgery``.

``from_pretrained`` (and so ``SentenceTransformer``) of a directory whose
``config.json`` holds the entry of :mod:`tnsurgery.io.hf_entry` builds the plain
architecture on the meta device and hands it to :class:`TnsurgeryQuantizer` (built by
:func:`classes`), which replays the recorded replacements exactly as
:func:`tnsurgery.load` does: the entry validated as untrusted data, only layer
classes that a registered transform declares, each layer first built on the meta
device and checked against the weights file's header (sizes bounded, shapes equal).
transformers then loads the weights into the surgered layers.

Registration (:func:`install`): ``import tnsurgery`` never imports transformers. If
transformers' quantizer registry (``transformers.quantizers.auto``) is already
imported, tnsurgery registers at once; otherwise a finder on ``sys.meta_path``
registers right after transformers imports it (what ``from_pretrained`` always
does first), then removes itself. Both import orders work, and a process that
never uses transformers never imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tnsurgery.errors import ModelLoadError
from tnsurgery.io import hf_entry
from tnsurgery.io.dry_run import meta_unsupported
from tnsurgery.io.manifests import Document, TensorInfo, read_document, read_header
from tnsurgery.io.pairs import replay
from tnsurgery.io.skeleton import renamer
from tnsurgery.layer import SurgeryLayer
from tnsurgery.manifest import Manifest, Replacement
from tnsurgery.plugins import get_registry

REGISTRY_MODULE = "transformers.quantizers.auto"
_CLASSES: tuple[type, type] | None = None


def classes() -> tuple[type, type]:
    """``(TnsurgeryConfig, TnsurgeryQuantizer)``: transformers' quantization config and
    quantizer for ``quant_method: tnsurgery`` (built once; needs transformers)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer  # optional dependency (hf extra)
    from transformers.utils.quantization_config import (  # optional dependency (hf extra)
        QuantizationConfigMixin,
    )

    class TnsurgeryConfig(QuantizationConfigMixin):
        """The ``quantization_config`` entry of a surgered directory, as read from
        ``config.json`` (validated by the quantizer, where the directory is known)."""

        def __init__(self, replacements: Any = None, **kwargs: Any) -> None:
            self.quant_method = hf_entry.QUANT_METHOD
            self.format_version = kwargs.pop("format_version", hf_entry.ENTRY_VERSION)
            self.tnsurgery_version = kwargs.pop("tnsurgery_version", None)
            self.replacements = replacements
            self.guards = kwargs.pop("guards", None) or []
            self.aliases = kwargs.pop("aliases", None) or {}

    class TnsurgeryQuantizer(HfQuantizer):
        """Replays the surgery on the meta model before transformers loads the weights."""

        requires_calibration = True  # only surgered checkpoints: nothing is made on the fly

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            files = kwargs.get("checkpoint_files") or []
            self._loaded = prepare(model, self.quantization_config.to_dict(), files)
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            finish(model, self._loaded)
            self.quantization_config = TnsurgeryConfig(**self._loaded.entry_for(model))
            model.config.quantization_config = self.quantization_config
            return model

        def get_state_dict_and_metadata(self, model: Any) -> tuple[dict, dict]:
            """``save_pretrained``: the model's tensors plus its guards, so the saved
            directory, too, refuses to load without tnsurgery."""
            state = model.state_dict()
            state.update({g: hf_entry.guard_tensor() for g in guards_of(model, set(state))})
            return state, {}

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    for cls in (TnsurgeryConfig, TnsurgeryQuantizer):  # importable by name (pickle)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _CLASSES = (TnsurgeryConfig, TnsurgeryQuantizer)
    return _CLASSES


def __getattr__(name: str) -> type:
    """``TnsurgeryConfig`` and ``TnsurgeryQuantizer``, built on first use."""
    if name in ("TnsurgeryConfig", "TnsurgeryQuantizer"):
        return classes()[name == "TnsurgeryQuantizer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register ``quant_method: tnsurgery`` with transformers (once; needs transformers).

    A transformers whose quantizer registry is not what this expects gets a warning,
    never an error: importing transformers must not fail because tnsurgery is there."""
    try:
        from transformers.quantizers import auto  # optional dependency (hf extra)

        config_cls, quantizer_cls = classes()
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(hf_entry.QUANT_METHOD, config_cls)
        auto.AUTO_QUANTIZER_MAPPING.setdefault(hf_entry.QUANT_METHOD, quantizer_cls)
    except Exception as exc:  # (an API of transformers' that changed)
        warnings.warn(
            f"tnsurgery could not register its loader with transformers ({exc}): surgered "
            "directories load with tnsurgery.load(OUT) only",
            RuntimeWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------ registration


class _Loader(importlib.abc.Loader):
    """The loader of transformers' quantizer registry, then :func:`register`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.inner
        register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Waits on ``sys.meta_path`` for transformers' quantizer registry, once."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != REGISTRY_MODULE:
            return None
        uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Make transformers load surgered directories: register now if its quantizer
    registry is imported, else as soon as it is (see the module docstring)."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    """Remove the finder of :func:`install` (registration done or no longer wanted)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


# ----------------------------------------------------------------- the replay


class Loaded:
    """What :func:`prepare` did to a model, for :func:`finish` and ``save_pretrained``."""

    def __init__(self, reps: list[Replacement], aliases: dict[str, str], where: Path) -> None:
        self.reps = reps
        self.aliases = aliases
        self.where = where
        self.inits: list[nn.Module] = []

    def entry_for(self, model: nn.Module) -> dict[str, Any]:
        """The entry of ``model`` as loaded (names as this class has them)."""
        manifest = Manifest(replacements=self.reps)
        return hf_entry.entry(manifest, guards_of(model, set(model.state_dict())), self.aliases)


def prepare(model: nn.Module, raw: dict[str, Any], files: list[str]) -> Loaded:
    """Replay the entry ``raw`` on ``model`` (the meta model transformers built from
    ``files``): validated, bounded and checked against the weights' header first."""
    paths = [Path(f) for f in files]
    where = (paths[0].parent if paths else Path(".")) / hf_entry.CONFIG_NAME
    entry = hf_entry.read_entry(raw, where)
    if not paths or any(p.suffix != ".safetensors" for p in paths):
        raise ModelLoadError(
            f"{where}: a tnsurgery model loads from .safetensors weights only, got "
            f"{[p.name for p in paths] or 'none'}"
        )
    header: dict[str, TensorInfo] = {}
    for p in paths:
        header.update(read_header(p))
    rename = renamer(model, header)
    modules = dict(model.named_modules())
    reps = []
    for i, rep in enumerate(entry.replacements):
        name = rename(rep.name)
        if name not in modules and name.split(".")[0] in modules:
            raise ModelLoadError(
                f"{where}: {type(model).__name__} has no module {rep.name} (quantization_config."
                f"replacements[{i}].name): is it the right architecture?"
            )
        if name in modules:  # else a head this class does not have (AutoModel)
            reps.append(rep.model_copy(update={"name": name}))
    if entry.replacements and not reps:
        raise ModelLoadError(
            f"{where}: {type(model).__name__} has none of the surgered modules: is it the "
            "right architecture?"
        )
    aligned = {rename(k): t for k, t in header.items()}
    aliases = {rename(a): rename(t) for a, t in entry.aliases.items()}
    guards = [rename(g) for g in entry.guards]
    doc = Document(Manifest(), where, paths[0], aliases, guards=guards)
    doc.what, doc.prefix = "quantization_config", "quantization_config."
    replay(model, reps, get_registry().layer_classes(), doc, aligned, build_on_meta)
    loaded = Loaded(reps, aliases, where)
    _expect(model, loaded, [*guards, *entry.guards])  # as loaded, and as reported
    return loaded


def build_on_meta(cls: type, config: dict, current: nn.Module | None) -> nn.Module:
    """A layer on the meta device (where transformers builds the model). One that
    cannot be built there (it reads the values of the module it wraps, e.g. ``qat``)
    is built on the CPU beside an empty copy of that module (as large as the module,
    which the dry run bounded) and moved to meta: the weights fill it afterwards."""
    try:
        return cls.from_config(config, current)
    except Exception as exc:  # noqa: BLE001 - a plugin's error: its message is kept
        if not meta_unsupported(exc):
            raise
    with torch.device("cpu"):
        real = current.to_empty(device="cpu") if current is not None else None
        return cls.from_config(config, real).to("meta")


def _expect(model: nn.Module, loaded: Loaded, guards: list[str]) -> None:
    """Tell transformers what is not missing nor unexpected (the guards; aliases it
    does not tie itself, copied by :func:`finish`), and keep its initialisation off
    the surgered layers and the modules around them that the checkpoint fills."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    loaded.aliases = {a: t for a, t in loaded.aliases.items() if a not in tied}
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    model._keys_to_ignore_on_load_unexpected = unexpected | {_exact(g) for g in guards}
    model._keys_to_ignore_on_load_missing = missing | {_exact(a) for a in loaded.aliases}
    around = {id(m) for m in model.modules() if isinstance(m, SurgeryLayer)}
    for rep in loaded.reps:
        parts = rep.name.split(".")
        around.update(id(model.get_submodule(".".join(parts[:k]))) for k in range(len(parts)))
    for sub in model.modules():
        init = getattr(sub, "_init_weights", None)
        if init is None or not hasattr(sub, "_initialize_weights"):
            continue
        sub._init_weights = _guarded_init(init, around)
        loaded.inits.append(sub)


def _exact(key: str) -> str:
    return f"^{re.escape(key)}$"


def _guarded_init(init: Any, around: set[int]) -> Any:
    """transformers' ``_init_weights`` of a model, skipping the surgered layers and
    their parents whenever the checkpoint filled all their tensors (an init would
    write the ``weight`` stand-in of a surgered layer, e.g. GPT-2's ``c_proj``)."""

    def guarded(module: nn.Module) -> Any:
        if id(module) in around and _filled(module):
            return None
        return init(module)

    return guarded


def _filled(module: nn.Module) -> bool:
    """Every tensor of ``module`` came from the checkpoint (non-persistent buffers: an
    empty one only, as one holding values may need the init)."""
    if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
        return False
    for name, buf in module.named_buffers():
        if _persistent(module, name):
            if not getattr(buf, "_is_hf_initialized", False):
                return False
        elif buf.numel():
            return False
    return True


def _persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in owner._non_persistent_buffers_set


def finish(model: nn.Module, loaded: Loaded) -> None:
    """After the weights loaded: undo :func:`_expect`'s init guard, copy the aliases
    transformers does not tie, refuse a layer whose state transformers cannot fill,
    and attach the manifest (the directory's ``manifest.json`` when it is the one of
    these weights, else a record of the replacements)."""
    for sub in loaded.inits:
        sub.__dict__.pop("_init_weights", None)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for alias, target in loaded.aliases.items():
            if alias in state and target in state and state[alias] is not state[target]:
                state[alias].copy_(state[target])
    for rep in loaded.reps:
        layer = model.get_submodule(rep.name)
        for name, buf in layer.named_buffers():
            if not _persistent(layer, name) and buf.numel():
                raise ModelLoadError(
                    f"{loaded.where}: {rep.layer} at {rep.name} keeps values outside its state "
                    f"(the buffer {name}): transformers cannot load it; use tnsurgery.load"
                )
    _manifest(loaded).attach(model)


def _manifest(loaded: Loaded) -> Manifest:
    own = loaded.where.parent / "manifest.json"
    if own.is_file():
        try:
            doc = read_document(own)
            names = [r.name for rec in doc.manifest.records() for r in rec.replacements]
            if names == [r.name for r in loaded.reps]:
                return doc.manifest
        except ModelLoadError:
            pass
    return Manifest(operation="load", replacements=loaded.reps)


def guards_of(model: nn.Module, keys: set[str]) -> list[str]:
    """The guards of a surgered ``model`` whose state has the names ``keys``."""
    manifest = Manifest.of(model) or Manifest()
    return hf_entry.guard_names(model, manifest, keys)


def attach(model: nn.Module) -> None:
    """Give a surgered Hugging Face model (read by :func:`tnsurgery.load`) the
    quantizer that ``from_pretrained`` would have given it, so ``save_pretrained``
    writes a directory that loads again (entry and guards)."""
    config_cls, quantizer_cls = classes()
    manifest = Manifest.of(model)
    if manifest is None or not hasattr(model, "config"):
        return
    keys = set(model.state_dict())
    value = hf_entry.entry(manifest, guards_of(model, keys), {})
    qc = config_cls(**{k: v for k, v in value.items() if k != "quant_method"})
    model.config.quantization_config = qc
    model.hf_quantizer = quantizer_cls(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = hf_entry.QUANT_METHOD


def attach_if_hf(model: nn.Module) -> None:
    """:func:`attach` for a surgered Hugging Face model (a ``PreTrainedModel``: its
    ``save_pretrained`` then writes a directory that loads again); nothing for others."""
    if type(model).__module__.startswith("transformers.") and hasattr(model, "save_pretrained"):
        attach(model)
