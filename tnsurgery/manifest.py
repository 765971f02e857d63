"""The manifest: the typed record of what surgery (and export, and training) did to a
model, attached to it and written beside every saved file.

A :class:`Manifest` is a pydantic model. On a model it is kept as plain JSON data
(so that a pickled model holds no tnsurgery object), read with :meth:`Manifest.of`
and written with :meth:`Manifest.attach`; :func:`get_manifest` gives that JSON
data. Each operation on an already surgered model makes a new manifest whose
``history`` holds the earlier ones, oldest first.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tnsurgery._version import __version__
from tnsurgery.transform import qualified_name

MANIFEST_ATTR = "_tnsurgery_manifest"
MANIFEST_FORMAT = "tnsurgery.manifest"
MANIFEST_VERSION = 1  # the newest format_version this tnsurgery reads and writes


class Replacement(BaseModel):
    """One module replaced: where, by which transform, with which layer and config."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., description="Dotted module name in the model.")
    transform: str | None = Field(None, description="The transform that made the layer.")
    layer: str = Field(..., description="Qualified class name of the new layer.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The layer's from_config arguments."
    )
    rule_index: int | None = None
    operation: str | None = None
    resolved: dict[str, Any] | None = None
    params_before: int | None = None
    params_after: int | None = None
    predicted_error: float | None = None
    weight_error: float | None = None
    output_error: float | None = None


class Manifest(BaseModel):
    """What was done to a model: the spec, each replacement, errors, versions."""

    model_config = ConfigDict(extra="allow")

    format: Literal["tnsurgery.manifest"] = MANIFEST_FORMAT
    format_version: int = Field(MANIFEST_VERSION, ge=1, le=MANIFEST_VERSION)
    tnsurgery_version: str = __version__
    torch_version: str = Field(default_factory=lambda: str(torch.__version__))
    created: str = Field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )
    base_model: str | None = None
    operation: str | None = None
    spec: dict[str, Any] | None = None
    replacements: list[Replacement] = Field(default_factory=list)
    not_replaced: list[dict[str, Any]] = Field(default_factory=list)
    output_error: float | None = None
    output_error_name: str | None = None
    plan: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    history: list[Manifest] = Field(default_factory=list)

    # ------------------------------------------------------------ on a model

    @classmethod
    def of(cls, model: nn.Module) -> Manifest | None:
        """The manifest attached to ``model``, or ``None`` if it was never surgered."""
        data = get_manifest(model)
        return None if data is None else cls.model_validate(data)

    def attach(self, model: nn.Module) -> None:
        """Attach this manifest to ``model`` (replacing any earlier one)."""
        object.__setattr__(model, MANIFEST_ATTR, self.to_dict())

    # ----------------------------------------------------------------- data

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible data (what is written to ``manifest.json``): values that JSON
        has no type for (a numpy integer, a dtype in a plugin's config) become strings;
        infinite errors stay infinite."""
        return json.loads(json.dumps(self.model_dump(), default=str))

    def after(self, previous: Manifest | None) -> Manifest:
        """This manifest with ``previous`` (and its history) as its history."""
        if previous is None:
            return self
        earlier = previous.model_copy(update={"history": []})
        return self.model_copy(update={"history": [*previous.history, earlier]})

    def records(self) -> list[Manifest]:
        """Every operation's manifest, oldest first, this one last."""
        return [*self.history, self]

    def surgered_names(self) -> list[str]:
        """Names of every module replaced by any recorded operation, in order (a fused
        module split into its parts is not one: only the parts replaced in it are)."""
        names = [
            r.name
            for record in self.records()
            for r in record.replacements
            if r.operation != "split"
        ]
        return list(dict.fromkeys(names))


def get_manifest(model: nn.Module) -> dict[str, Any] | None:
    """The record of the surgery done on ``model`` (spec, resolved params, errors,
    versions), as JSON data, or ``None`` if it was never surgered."""
    return getattr(model, MANIFEST_ATTR, None)


def record(model: nn.Module, key: str, value: Any) -> None:
    """Add ``key: value`` to the manifest attached to ``model`` (e.g. ``"training"``);
    nothing when the model has none."""
    data = get_manifest(model)
    if data is not None:
        object.__setattr__(model, MANIFEST_ATTR, {**data, key: value})


def refresh_configs(model: nn.Module) -> None:
    """Keep the manifest's layer configs in step with layers training reshaped (ranks
    lowered), so that :func:`tnsurgery.load` rebuilds the right shapes."""
    manifest = Manifest.of(model)
    if manifest is None:
        return
    modules = dict(model.named_modules())
    for rec in manifest.records():
        for rep in rec.replacements:
            layer = modules.get(rep.name)
            # the layer itself, or the one a wrapper (qat) holds
            while layer is not None and qualified_name(type(layer)) != rep.layer:
                layer = getattr(layer, "inner", None)
            if layer is not None and hasattr(layer, "config"):
                rep.config = layer.config()
    manifest.attach(model)
