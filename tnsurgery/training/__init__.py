"""Post-surgery training: label-free distillation from the original model, or fine-tuning.

:func:`train` runs the spec's ``training`` section (its options are
:class:`tnsurgery.spec.Training`) on a surgered model through the trainer the
section names: the built-in loop (:mod:`tnsurgery.builtins.trainer`, registered as
``"builtin"`` like any plugin's) or a plugin's (``register_trainers``).

- ``distill`` (default): the original model is the teacher (frozen, eval mode).
  Feature distillation matches the output of every surgered module to the output
  of the module it replaced (normalized MSE), which needs no label; output
  distillation adds KL at temperature ``T`` on classifier logits, or a normalized
  MSE / cosine on other outputs; with labels, the task loss is mixed in by ``alpha``.
- ``finetune``: the task loss alone (cross-entropy or MSE) on labelled batches.

The package holds what loops share: :mod:`~tnsurgery.training.steps` (schedule,
batches, optimizer, evaluation...), :mod:`~tnsurgery.training.losses`,
:mod:`~tnsurgery.training.checkpoints` (exact resume) and
:mod:`~tnsurgery.training.recipes` (progressive rank and unfreezing, TT hygiene).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from tnsurgery.errors import UserInputError
from tnsurgery.manifest import Manifest, get_manifest, record
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec import (
    CheckpointOptions,
    DistillOptions,
    ProgressiveRank,
    Training,
    TTOptions,
)
from tnsurgery.trainer import Trainer, TrainResult
from tnsurgery.training.steps import evaluate, training_options

__all__ = [
    "CheckpointOptions",
    "DistillOptions",
    "ProgressiveRank",
    "TTOptions",
    "TrainResult",
    "Trainer",
    "Training",
    "builtin_train",
    "evaluate",
    "surgered_names",
    "train",
]


def train(
    model: nn.Module,
    spec_or_training: Any,
    teacher: nn.Module | None = None,
    *,
    registry: Registry | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train a surgered ``model`` in place as the spec's ``training`` section says.

    Args:
        model: the surgered model (its manifest names the surgered modules).
        spec_or_training: a spec (dict, path, :class:`~tnsurgery.spec.Spec`) with a
            ``training`` section, or a :class:`Training` / its dict.
        teacher: the original model (required for ``distill``); frozen here.
        registry: data sources, trainers and transforms (installed plugins by default).
        progress: ``progress(step, steps, metrics)`` after each step (under
            torchrun, in the process of rank 0 only).
        resume: continue from the latest checkpoint in ``checkpoint.dir`` if any.

    Returns:
        A :class:`TrainResult`; it is also recorded in the model's manifest
        under ``"training"``. An ``"evaluation"`` the manifest holds from before
        (the surgered model scored by ``apply``) no longer describes the model: it
        gets a ``"stale"`` note saying so (``tnsurgery train`` scores the trained
        model again when the spec has an ``evaluation`` section).
        ``training.trainer`` picks the loop: the built-in one or a plugin's. With
        ``training.distributed`` ``"fsdp"`` under torchrun, the built-in loop trains
        sharded copies of ``model`` and ``teacher``
        (:mod:`~tnsurgery.training.distributed`) and ends with the trained weights
        in ``model`` on every process.
    """
    opts = training_options(spec_or_training, registry)
    registry = registry or get_registry()
    try:
        trainer = registry.get_trainer(opts.trainer)
    except KeyError as exc:
        raise UserInputError(f"training: field 'trainer': {exc.args[0]}") from None
    result = trainer.train(
        model, opts, teacher, registry=registry, progress=progress, resume=resume
    )
    _mark_evaluation_stale(model, result.steps)
    return result


def _mark_evaluation_stale(model: nn.Module, steps: int) -> None:
    evaluation = (get_manifest(model) or {}).get("evaluation")
    if isinstance(evaluation, dict) and steps:
        note = f"measured before {steps} training steps; run 'tnsurgery eval' on this model"
        record(model, "evaluation", {**evaluation, "stale": note})


def builtin_train(model: nn.Module, spec_or_training: Any, teacher: nn.Module | None = None, **kw):
    """The built-in loop (:mod:`tnsurgery.builtins.trainer`), reached through the
    registry like any trainer, whatever ``training.trainer`` says; the arguments of
    :func:`train`."""
    registry = kw.get("registry") or get_registry()
    kw["registry"] = registry
    trainer = registry.get_trainer("builtin")
    return trainer.train(model, training_options(spec_or_training, registry), teacher, **kw)


def surgered_names(model: nn.Module) -> list[str]:
    """Names of the modules surgery made (from the manifest attached to ``model``)."""
    manifest = Manifest.of(model)
    return manifest.surgered_names() if manifest is not None else []
