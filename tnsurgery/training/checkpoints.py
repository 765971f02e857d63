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

CHECKPOINT_NAME = "last.pt"


def check_own_dir(directory: Path) -> None:
    """A checkpoint directory that exists must hold only tnsurgery checkpoints (a spec
    names it: it may not make training write into someone else's directory)."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise UserInputError(f"training: checkpoint dir {directory} is not a directory")
    if not directory.exists():
        return
    others = [
        p.name
        for p in directory.iterdir()
        if p.name != CHECKPOINT_NAME and not p.name.startswith(f".{CHECKPOINT_NAME}.tnsurgery-")
    ]
    if others:
        raise UserInputError(
            f"training: checkpoint dir {directory} holds files that are not tnsurgery "
            f"checkpoints ({', '.join(sorted(others)[:3])}): give a new or empty directory"
        )


def check_own_log(path: str | Path) -> None:
    """A metrics log that exists must be one tnsurgery wrote (JSON lines with a
    ``step``): a spec may not make training append to, or trim, another file."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise UserInputError(f"training: the log {p} is not a regular file")
    if not p.exists():
        return
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
        ours = all(isinstance(json.loads(line).get("step"), int) for line in lines if line)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        ours = False
    if not ours:
        raise UserInputError(
            f"training: the log {p} exists and is not a tnsurgery metrics log; "
            "choose another file"
        )


def save_checkpoint(directory: Path, model, optimizer, state: dict, best_state) -> None:
    """Write ``directory/last.pt`` atomically: model, optimizer, loop state, the best
    state so far and the RNG states."""
    check_own_dir(directory)
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
    with atomic_files(directory / CHECKPOINT_NAME) as (tmp,):
        torch.save(payload, tmp)


def recipe(opts: Training) -> str:
    """The options a checkpoint must share with the run resuming it (all but the
    length of the run and where it writes)."""
    return opts.model_dump_json(exclude={"steps", "checkpoint", "log", "tensorboard"})


def trim_log(path: str | None, step: int) -> None:
    """Drop the metrics lines written after the checkpoint a run resumes from."""
    if not path or not Path(path).exists():
        return
    check_own_log(path)
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


def restore_state(model, state: dict) -> str | None:
    """Load ``state`` (a ``state_dict`` kept earlier, e.g. the best evaluated) into
    ``model``, all or nothing: ``None`` once loaded, else why it cannot be (keys or
    shapes differ, e.g. ranks cut since), the model left exactly as it was."""
    current = model.state_dict()
    missing = [k for k in current if k not in state]
    extra = [k for k in state if k not in current]
    reshaped = [
        f"{k} {list(state[k].shape)} -> {list(v.shape)}"
        for k, v in current.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if reshaped:
        problems.append("shapes changed since (" + ", ".join(reshaped[:4]) + ")")
    if missing or extra:
        problems.append(
            "tensors added or removed since (" + ", ".join([*missing, *extra][:4]) + ")"
        )
    if problems:
        return "; ".join(problems)
    kept = {k: v.detach().clone() for k, v in current.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # what the checks above did not foresee: nothing half-loaded
        model.load_state_dict(kept)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None
