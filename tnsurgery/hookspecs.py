"""The plugin hooks of tnsurgery: this module is the plugin author's reference.

A plugin is a module (or object) with functions decorated by
``tnsurgery.hookimpl`` whose names match the hookspecs below, exposed through
the ``tnsurgery`` entry-point group of its package::

    [project.entry-points.tnsurgery]
    myplugin = "my_package.my_module"

The built-in transforms are registered through the very same entry-point
group, so anything they do a third-party plugin can do.

:class:`Split`, what ``register_splits`` takes, is defined here: it is no more than
the contract of that hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from torch import nn

    from tnsurgery.datasource import DataSource
    from tnsurgery.plan import Plan
    from tnsurgery.trainer import Trainer
    from tnsurgery.transform import Transform

hookspec = pluggy.HookspecMarker("tnsurgery")
hookimpl = pluggy.HookimplMarker("tnsurgery")


@dataclass(frozen=True)
class Split:
    """A fused module that surgery splits into parts that transforms take, as a plugin
    registers it (``register_splits``).

    Some modules compute with weights no transform can reach: ``nn.MultiheadAttention``
    keeps its query, key and value projections in one bare parameter and never calls
    its ``out_proj``. A :class:`Split` says how to turn such a module into an exact
    equivalent whose parts are ordinary modules it calls (the built-in
    ``multihead_attention`` split: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
    each an ``nn.Linear``).

    When a spec rule would select one of those parts (its ``match`` patterns, minus
    ``exclude``, name ``<module>.<part>`` and the part is of the rule's ``types`` and of
    a type its transform takes), surgery puts the split module in place of the fused
    one first, and the parts are then ordinary targets (planned, calibrated, budgeted,
    replaced, refitted, verified, trained). A fused module none of whose parts ends up
    replaced is put back as it was: a run changes no module nobody asked for. A split
    that stays is recorded in the manifest as a replacement (``"operation":
    "split"``) before those of its parts, so :func:`tnsurgery.load` replays it.

    Attributes:
        name: names the split in messages and ``tnsurgery plugins``.
        module_types: the fused module classes it splits (``isinstance``).
        parts: the names of the split module's children that rules may target. Only a
            module whose ``<name>.<part>`` some rule's patterns match is split.
        split: ``split(module) -> nn.Module | None``: the exact equivalent of
            ``module`` (same outputs, same parameters in other places, on its device
            and dtype, in its training mode), with the ``parts`` as children; it must
            not modify ``module``. ``None`` declines (e.g. a subclass whose forward
            computes something else): the module stays fused.
        layers: the classes ``split`` returns. They are what :func:`tnsurgery.load`
            may instantiate from a manifest (like a transform's ``layers``), so each
            needs ``config()`` and ``from_config(config, current)`` building it empty.
            They must not derive from ``SurgeryLayer``: the parts of a layer surgery
            built are never targets of their own.
        description: one line for ``tnsurgery plugins``.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    parts: tuple[str, ...]
    split: Callable[[nn.Module], nn.Module | None]
    layers: tuple[type[nn.Module], ...]
    description: str = ""


@hookspec
def register_transforms(register: Callable[[Transform], None]) -> None:
    """Register the transforms this plugin provides.

    Called once when the plugin manager is built. Call ``register`` once per
    transform with a :class:`tnsurgery.transform.Transform`: its ``name``
    (the spec's ``"transform"``), its ``params_model`` (a pydantic model with
    ``extra="forbid"`` that validates the rule's ``"params"``), the
    ``module_types`` it accepts, ``build(module, params, ctx)`` that returns
    the replacement module made from the trained one, and optionally
    ``plan(module, params, ctx)`` that predicts the result without building,
    and ``layers``, the classes ``build`` may return (needed by
    :func:`tnsurgery.load`). Registering a name twice is an error.
    """


@hookspec
def register_splits(register: Callable[[Split], None]) -> None:
    """Register the fused modules this plugin can split into compressible parts.

    Called once when the plugin manager is built. Call ``register`` once per kind
    of fused module with a :class:`Split` (``name``, ``module_types``, ``parts``,
    ``split``, ``layers``: see there for what surgery does with it). The built-in
    ``multihead_attention`` split turns an ``nn.MultiheadAttention`` into a
    ``tnsurgery.layers.attention.SplitMultiheadAttention`` whose ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj`` are ``nn.Linear`` children. Registering
    a name twice is an error.
    """


@hookspec
def before_surgery(model: nn.Module, plan: Plan) -> None:
    """Called by :func:`tnsurgery.surgery.apply` once, before any module is replaced.

    ``model`` is the model about to be modified (the copy unless
    ``inplace=True``) and ``plan`` the :class:`tnsurgery.plan.Plan` of the
    first rule pass: rules are passes, so later ones are planned on the model
    as earlier ones leave it, and appended to the same object as they run.
    Observe only: raising here aborts the surgery and leaves the model as it was.
    """


@hookspec
def after_surgery(model: nn.Module, plan: Plan, manifest: dict[str, Any]) -> None:
    """Called by :func:`tnsurgery.surgery.apply` once every replacement is in place
    and verified.

    ``plan`` now carries measured errors; ``manifest`` is the JSON-compatible
    record of what was done (the same that is attached to the model and
    written beside every saved file). Observe only.
    """


@hookspec
def register_data_sources(register: Callable[[DataSource], None]) -> None:
    """Register the data sources this plugin provides (for ``calibration`` and
    ``training`` data in a spec).

    Call ``register`` once per source with a :class:`tnsurgery.datasource.DataSource`:
    its ``name`` (the spec's ``"source"``), its ``params_model`` (pydantic,
    ``extra="forbid"``: the other keys of the ``data`` object), and
    ``batches(params, ctx)`` returning an iterable of batches (a tensor, a
    tuple of tensors, or a dict of tensors for keyword inputs), each of at most
    ``ctx.batch_size`` examples along dim 0 (see :class:`tnsurgery.datasource.DataContext`).
    """


@hookspec
def register_trainers(register: Callable[[Trainer], None]) -> None:
    """Register training loops that a spec's ``"training": {"trainer": NAME}`` selects.

    Call ``register`` once per loop with a :class:`tnsurgery.trainer.Trainer`:
    its ``name`` and ``train(model, training, teacher, *, registry, progress,
    resume)``, which trains the surgered ``model`` in place as the validated
    :class:`tnsurgery.spec.Training` says (``teacher`` is the original model,
    frozen) and returns a :class:`tnsurgery.trainer.TrainResult`. The built-in
    loop is registered the same way, as ``"builtin"``.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``tnsurgery`` command line.

    Called once when the CLI starts, with the top-level ``click.Group``;
    use ``@cli.command()`` to add commands.
    """
