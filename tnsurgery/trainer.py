"""What a trainer plugin provides: :class:`Trainer`, and the :class:`TrainResult` it
returns (see the ``register_trainers`` hook)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What a training run did: steps, losses, evaluations, timing, best state.

    ``kept`` is the state the model ends with: ``"best"`` (the evaluated state of
    ``best_step``/``best_metric``, restored by ``keep_best``) or ``"last"``;
    ``kept_reason`` says why the last one when ``keep_best`` asked for the best
    (no evaluation, or a best state that no longer fits the model). A trainer
    reports ``best_metric``/``best_step`` only for a state the model holds
    (``kept == "best"``) or, when ``keep_best`` is off, as the best seen.
    """

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    resumed_from: int | None = None
    kept: str = "last"
    kept_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible summary (for the manifest)."""
        return {
            "steps": self.steps,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "evals": self.evals,
            "seconds": round(self.seconds, 2),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "resumed_from": self.resumed_from,
            "kept": self.kept,
            "kept_reason": self.kept_reason,
        }


@dataclass(frozen=True)
class Trainer:
    """A training loop, as a plugin registers it (``register_trainers`` hook).

    Attributes:
        name: the ``training.trainer`` value that selects it.
        train: ``train(model, training, teacher, *, registry, progress, resume)``
            with the arguments of :func:`tnsurgery.training.train` (``training``
            a validated :class:`tnsurgery.spec.Training`); returns a
            :class:`TrainResult`.
        description: one line for ``tnsurgery plugins``.
    """

    name: str
    train: Callable[..., TrainResult]
    description: str = ""
