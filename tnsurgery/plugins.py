"""The plugin manager: built-in and third-party plugins, found one way.

Every plugin, the built-in ones included (:mod:`tnsurgery.transforms` and
:mod:`tnsurgery.builtins`), is a module named by an entry point in the
``tnsurgery`` group. When tnsurgery runs from a source tree that was not
installed (no entry-point metadata), its own built-ins are registered from
:data:`DEFAULT_PLUGINS` through the same manager. Nothing else in the core
imports a built-in plugin: it reaches them through :func:`get_registry`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tnsurgery import hookspecs
from tnsurgery.datasource import DataSource
from tnsurgery.errors import did_you_mean
from tnsurgery.hookspecs import Split
from tnsurgery.trainer import Trainer
from tnsurgery.transform import Transform, qualified_name

__all__ = [
    "DEFAULT_PLUGINS",
    "PluginFailure",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "load_failures",
    "qualified_name",
    "unknown_name_message",
]

GROUP = "tnsurgery"
DEFAULT_PLUGINS = (
    "tnsurgery.transforms.factorize",
    "tnsurgery.transforms.tt",
    "tnsurgery.transforms.cp",
    "tnsurgery.transforms.tucker",
    "tnsurgery.transforms.qat",
    "tnsurgery.transforms.attention",
    "tnsurgery.builtins.data_sources",
    "tnsurgery.builtins.trainer",
)


@dataclass
class PluginFailure:
    """A plugin whose module could not be imported or registered."""

    name: str
    origin: str
    error: str


@dataclass
class Registry:
    """Everything the installed plugins provide, by name."""

    transforms: dict[str, Transform] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    data_sources: dict[str, DataSource] = field(default_factory=dict)
    data_origins: dict[str, str] = field(default_factory=dict)
    trainers: dict[str, Trainer] = field(default_factory=dict)
    trainer_origins: dict[str, str] = field(default_factory=dict)
    splits: dict[str, Split] = field(default_factory=dict)
    split_origins: dict[str, str] = field(default_factory=dict)

    def get_trainer(self, name: str) -> Trainer:
        """The trainer called ``name``; ``KeyError`` with the closest names otherwise."""
        try:
            return self.trainers[name]
        except KeyError:
            raise KeyError(unknown_name_message("trainer", name, self.trainers)) from None

    def get_data_source(self, name: Any) -> DataSource:
        """The data source called ``name``; ``KeyError`` with the closest names otherwise."""
        try:
            return self.data_sources[name]
        except (KeyError, TypeError):
            raise KeyError(
                unknown_name_message("data source", str(name), self.data_sources)
            ) from None

    def get(self, name: str) -> Transform:
        """The transform called ``name``; ``KeyError`` with the closest names otherwise."""
        try:
            return self.transforms[name]
        except KeyError:
            raise KeyError(unknown_name_message("transform", name, self.transforms)) from None

    def layer_classes(self) -> dict[str, type]:
        """Every layer class a registered transform may build or a registered split may
        put in place of a fused module, by qualified name (what :func:`tnsurgery.load`
        may instantiate)."""
        out: dict[str, type] = {}
        for t in self.transforms.values():
            for cls in t.layers:
                out[qualified_name(cls)] = cls
        for s in self.splits.values():
            for cls in s.layers:
                out[qualified_name(cls)] = cls
        return out

    def split_for(self, module: object) -> Split | None:
        """The registered split that takes ``module`` (the first, built-ins first), or
        ``None``."""
        return next((s for s in self.splits.values() if isinstance(module, s.module_types)), None)


def unknown_name_message(kind: str, name: str, valid) -> str:
    """``unknown transform 'fatorize'; did you mean 'factorize'? (valid: ...)``."""
    valid = sorted(valid)
    hint = did_you_mean(name, valid)
    return f"unknown {kind} '{name}'{hint} (valid: {', '.join(valid) or 'none installed'})"


_manager: pluggy.PluginManager | None = None


def get_plugin_manager(refresh: bool = False) -> pluggy.PluginManager:
    """The process-wide plugin manager with every installed plugin registered.

    Entry points that fail to import are recorded (see :func:`get_registry`)
    and warned about, never raised: a broken plugin must not break the CLI.
    """
    global _manager
    if _manager is not None and not refresh:
        return _manager
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm._tnsurgery_failures = []  # type: ignore[attr-defined]
    pm._tnsurgery_origins = {}  # type: ignore[attr-defined]
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        origin = "builtin" if dist == "tnsurgery" else dist
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a third party's import error must not stop us
            _record_failure(pm, ep.name, origin, exc)
            continue
        pm._tnsurgery_origins[ep.name] = origin  # type: ignore[attr-defined]
    for modname in DEFAULT_PLUGINS:
        module = importlib.import_module(modname)
        if not pm.is_registered(module):
            name = modname.rsplit(".", 1)[-1]
            pm.register(module, name=name if not pm.has_plugin(name) else modname)
            pm._tnsurgery_origins[pm.get_name(module)] = "builtin"  # type: ignore[attr-defined]
    _manager = pm
    return pm


def load_failures(pm: pluggy.PluginManager | None = None) -> list[PluginFailure]:
    """The plugins whose module could not be imported when the manager was built."""
    pm = pm or get_plugin_manager()
    return list(getattr(pm, "_tnsurgery_failures", []))


def _record_failure(pm: pluggy.PluginManager, name: str, origin: str, exc: BaseException) -> None:
    error = f"{type(exc).__name__}: {exc}"
    pm._tnsurgery_failures.append(PluginFailure(name, origin, error))  # type: ignore[attr-defined]
    warnings.warn(f"tnsurgery plugin '{name}' ({origin}) failed to load: {error}", stacklevel=3)


def get_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Ask every registered plugin for its transforms (data sources, trainers, splits)
    and return them by name.

    Each plugin's ``register_transforms`` is called separately so that each
    transform's origin is known, and so that one plugin that fails while
    registering is reported without hiding the others.
    """
    pm = pm or get_plugin_manager()
    reg = Registry(failures=list(getattr(pm, "_tnsurgery_failures", [])))
    origins = getattr(pm, "_tnsurgery_origins", {})
    _collect(
        pm.hook.register_transforms,
        Transform,
        "transform",
        reg.transforms,
        reg.origins,
        reg,
        origins,
    )
    _collect(
        pm.hook.register_data_sources,
        DataSource,
        "data source",
        reg.data_sources,
        reg.data_origins,
        reg,
        origins,
    )
    _collect(
        pm.hook.register_trainers,
        Trainer,
        "trainer",
        reg.trainers,
        reg.trainer_origins,
        reg,
        origins,
    )
    _collect(pm.hook.register_splits, Split, "split", reg.splits, reg.split_origins, reg, origins)
    return reg


def _collect(
    hook, kind: type, label: str, into: dict, into_origins: dict, reg: Registry, origins: dict
) -> None:
    """Call each plugin's registration hook separately (built-ins first, so that a third
    party never takes a built-in's name, whatever order the entry points were found in),
    so that each item's origin is known and one failing plugin hides no other."""
    impls = sorted(hook.get_hookimpls(), key=lambda i: origins.get(i.plugin_name) != "builtin")
    for impl in impls:
        origin = origins.get(impl.plugin_name, impl.plugin_name)
        found: list = []
        try:
            impl.function(register=found.append)
            for item in found:
                if not isinstance(item, kind):
                    raise TypeError(
                        f"register() expects a {kind.__name__}, got {type(item).__name__}"
                    )
                if item.name in into:
                    raise ValueError(
                        f"{label} '{item.name}' is already registered by {into_origins[item.name]}"
                    )
        except Exception as exc:
            reg.failures.append(
                PluginFailure(impl.plugin_name, origin, f"{type(exc).__name__}: {exc}")
            )
            continue
        for item in found:
            into[item.name] = item
            into_origins[item.name] = origin
