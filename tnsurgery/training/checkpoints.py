"""Training checkpoints: written atomically, read with ``weights_only``, resumed exactly
(model, optimizer, schedule state, RNG states), and refused when written by a run
with other options."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tnsurgery.atomic import atomic_files
from tnsurgery.errors import UserInputError
from tnsurgery.spec import Training


def save_checkpoint(directory: Path, model, optimizer, state: dict, best_state) -> None:
    """Write ``directory/last.pt`` atomically: model, optimizer, loop state, the best
    state so far and the RNG states."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": {k: v for k, v in state.items() if k != "best_state"},
        "best_state": best_state,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    with atomic_files(directory / "last.pt") as (tmp,):
        torch.save(payload, tmp)


def recipe(opts: Training) -> str:
    """The options a checkpoint must share with the run resuming it (all but the
    length of the run and where it writes)."""
    return opts.model_dump_json(exclude={"steps", "checkpoint", "log", "tensorboard"})


def trim_log(path: str | None, step: int) -> None:
    """Drop the metrics lines written after the checkpoint a run resumes from."""
    if not path or not Path(path).exists():
        return
    kept = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    Path(path).write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only`` (a clear error if it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(f"training: cannot read checkpoint {path}: {exc}") from None


def apply_checkpoint(payload: dict, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from ``payload``; returns the loop state
    (with ``best_state``)."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise UserInputError(
            f"training: the checkpoint does not fit this model (another spec?): {exc}"
        ) from None
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    random.setstate(payload["rng"]["python"])
    state = dict(payload["state"])
    state["best_state"] = payload.get("best_state")
    return state
