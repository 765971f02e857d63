"""Training checkpoints: written atomically, read with ``weights_only``, resumed exactly
(model, optimizer, schedule state, RNG states), and refused when written by a run
with other options."""

from __future__ import annotations

import json
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tnsurgery.atomic import atomic_files
from tnsurgery.errors import UserInputError
from tnsurgery.pickles import load_weights_only
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


MAX_LOG_LINE = 1 << 20
"""Longest line (bytes) of a metrics log tnsurgery writes: a longer one is not ours."""


def check_own_log(path: str | Path) -> None:
    """A metrics log that exists must be one tnsurgery wrote: JSON lines, each with
    a ``step``, at least one of them (a spec may not make training append to, or
    trim, another file, an empty one included). Read line by line, each at most
    :data:`MAX_LOG_LINE` bytes: memory stays bounded whatever the file's size."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise UserInputError(f"training: the log {p} is not a regular file")
    if not p.exists():
        return
    try:
        lines = sum(1 for _ in _log_lines(p))
    except (OSError, ValueError):
        lines = None
    if lines == 0:
        raise UserInputError(
            f"training: the log {p} exists and is empty (no metrics line); "
            "remove it or choose another file"
        )
    if lines is None:
        raise UserInputError(
            f"training: the log {p} exists and is not a tnsurgery metrics log; choose another file"
        )


def _log_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Each non-blank line of a metrics log with its ``step``, read one line at a
    time; a :class:`ValueError` at the first line that is not tnsurgery's (too long,
    not UTF-8 JSON, no integer ``step``) or if ``path`` is not a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with os.fdopen(os.open(path, flags), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        while line := f.readline(MAX_LOG_LINE + 1):
            if len(line.rstrip(b"\r\n")) > MAX_LOG_LINE:
                raise ValueError("a line too long")
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                step = entry.get("step")
            except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
                raise ValueError("not a metrics line") from None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError("no integer step")
            yield line.rstrip(b"\r\n"), step


def save_checkpoint(directory: Path, model, optimizer, state: dict, best_state) -> None:
    """Write ``directory/last.pt`` atomically: model, optimizer, loop state, the best
    state so far and the RNG states."""
    write_checkpoint(directory, model.state_dict(), optimizer.state_dict(), state, best_state)


def write_checkpoint(
    directory: Path, model_state: dict, optimizer_state: dict, state: dict, best_state
) -> None:
    """:func:`save_checkpoint` of states already taken: a model's full ``state_dict``
    and an optimizer's, keyed by parameter position (``Optimizer.state_dict``'s
    format), e.g. gathered from the shards of an FSDP run."""
    check_own_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_state,
        "optimizer": optimizer_state,
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
    length of the run, where it writes, and whether it is sharded: an FSDP run
    computes what one process does)."""
    return opts.model_dump_json(
        exclude={"steps", "checkpoint", "log", "tensorboard", "distributed"}
    )


def trim_log(path: str | None, step: int) -> None:
    """Drop the metrics lines written after the checkpoint a run resumes from (the
    log read line by line and rewritten atomically; removed if no line is left, so
    no empty log is left behind)."""
    if not path or not Path(path).exists():
        return
    check_own_log(path)
    target = Path(path)
    kept = 0
    try:
        with atomic_files(target) as (tmp,), open(tmp, "wb") as out:
            for line, at in _log_lines(target):
                if at <= step:
                    out.write(line + b"\n")
                    kept += 1
        if not kept:
            target.unlink()
    except ValueError:  # changed since it was checked
        raise UserInputError(
            f"training: the log {target} is not a tnsurgery metrics log; choose another file"
        ) from None
    except OSError as exc:
        raise UserInputError(f"training: cannot write the log {target}: {exc}") from None


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only``: a regular file (checked before it is
    opened: a FIFO would block, a device never end) whose entries are those
    :func:`save_checkpoint` writes. Any defect is a :class:`UserInputError` naming the
    file and what is wrong."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserInputError(f"training: checkpoint {path} is not a regular file")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(path, flags), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserInputError(f"training: checkpoint {path} is not a regular file")
            payload = load_weights_only(f, path)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"training: cannot read checkpoint {path}: {exc}") from None
    problem = checkpoint_problem(payload)
    if problem is not None:
        raise UserInputError(_malformed(path, problem))
    return payload


def _malformed(path: Path, problem: str) -> str:
    return (
        f"training: checkpoint {path} is malformed: {problem}; remove it (or give another "
        "checkpoint dir) to start afresh"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensors_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        return f"'{what}' is not a dict of named tensors"
    return None


def _is_rank(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_RANK


MAX_RANK = 2**31
"""Largest rank a checkpoint's ``state.start_ranks`` may give."""
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
_STATE_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "recipe": (lambda v: v is None or isinstance(v, str), "a string"),
    "losses": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
    "evals": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list"),
    "best_metric": (lambda v: v is None or _is_number(v), "a number"),
    "best_step": (lambda v: v is None or _is_int(v), "an integer"),
    "plateau_scale": (_is_number, "a number"),
    "grad_scaler": (
        lambda v: (
            v is None
            or v == {}
            or (isinstance(v, dict) and all(_is_number(v.get(k)) for k in _SCALER_KEYS))
        ),
        "a GradScaler state",
    ),
    "start_ranks": (
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and all(
                    isinstance(k, str)
                    and (_is_rank(r) or (isinstance(r, (list, tuple)) and all(map(_is_rank, r))))
                    for k, r in v.items()
                )
            )
        ),
        "a dict of layer names to ranks",
    ),
}


def checkpoint_problem(payload: Any) -> str | None:
    """What makes ``payload`` not a checkpoint :func:`save_checkpoint` writes (the
    types of its entries), or ``None``. Whether it fits the model and optimizer is
    checked by :func:`apply_checkpoint`."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict"
    missing = [k for k in ("model", "optimizer", "state", "rng") if k not in payload]
    if missing:
        return "no " + ", ".join(f"'{k}'" for k in missing) + " entry"
    problem = _tensors_problem(payload["model"], "model")
    if problem is None and payload.get("best_state") is not None:
        problem = _tensors_problem(payload["best_state"], "best_state")
    return (
        problem
        or _optimizer_problem(payload["optimizer"])
        or _state_problem(payload["state"])
        or _rng_problem(payload["rng"])
    )


def _optimizer_problem(saved: Any) -> str | None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return "'optimizer' is not an optimizer state (a dict with 'state' and 'param_groups')"
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(map(_is_int, g["params"]))
        for g in groups
    ):
        return "'optimizer' has no 'param_groups' (a list of groups of parameter indices)"
    if not all(_is_int(k) and isinstance(v, dict) for k, v in saved["state"].items()):
        return "'optimizer' has a 'state' that is not a dict of parameter index to dict"
    return None


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "'state' is not a dict"
    if not _is_int(state.get("step")) or state["step"] < 0:
        return "'state' has no 'step' (an integer, 0 or more)"
    for key, (ok, what) in _STATE_TYPES.items():
        if key in state and not ok(state[key]):
            return f"'state.{key}' is not {what}"
    return None


def _rng_problem(rng: Any) -> str | None:
    if not isinstance(rng, dict) or "torch" not in rng or "python" not in rng:
        return "'rng' is not a dict with 'torch' and 'python' states"
    try:
        torch.Generator().set_state(rng["torch"])
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"'rng.torch' is not a torch generator state ({_first_line(exc)})"
    try:
        random.Random().setstate(rng["python"])
    except (TypeError, ValueError, OverflowError) as exc:
        return f"'rng.python' is not a Python random state ({_first_line(exc)})"
    cuda = rng.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        return "'rng.cuda' is not a list of CUDA generator states"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def apply_checkpoint(payload: dict, model, optimizer, path: Path) -> dict:
    """Restore model, optimizer and RNG states from ``payload`` (read by
    :func:`read_checkpoint` from ``path``); returns the loop state (with
    ``best_state``). A checkpoint that does not fit is a :class:`UserInputError`
    naming ``path``, the model left as it was."""
    why = _fit_problem(model, payload["model"])
    if why is not None:
        raise UserInputError(
            f"training: the checkpoint {path} does not fit this model (another spec?): {why}"
        )
    why = _load_optimizer(optimizer, payload["optimizer"])
    if why is not None:
        raise UserInputError(_malformed(path, f"its optimizer state does not fit: {why}"))
    why = restore_state(model, payload["model"])
    if why is not None:
        raise UserInputError(
            f"training: the checkpoint {path} does not fit this model (another spec?): {why}"
        )
    torch.set_rng_state(payload["rng"]["torch"])
    random.setstate(payload["rng"]["python"])
    if payload["rng"].get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise UserInputError(
                _malformed(path, f"'rng.cuda' does not fit ({_first_line(exc)})")
            ) from None
    state = dict(payload["state"])
    state["best_state"] = payload.get("best_state")
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> str | None:
    """Load the saved per-parameter state into ``optimizer``, whose settings (the
    same by the recipe check) are kept; why it cannot be, or ``None``."""
    current = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if len(groups) != len(current):
        return f"{len(groups)} parameter groups, the optimizer has {len(current)}"
    merged = {
        "state": saved["state"],
        "param_groups": [
            {**now, "params": list(old["params"])} for old, now in zip(groups, current, strict=True)
        ],
    }
    try:
        optimizer.load_state_dict(merged)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        return _first_line(exc)
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    required = {"step", "exp_avg", "exp_avg_sq"} if adam else set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            kept = optimizer.state.get(p) or {}
            if kept and not required <= kept.keys():
                return f"a parameter's state lacks {sorted(required - kept.keys())}"
            for key, value in kept.items():
                if key == "momentum_buffer" and value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    return f"a parameter's '{key}' is a {type(value).__name__}, not a tensor"
                if key == "step":
                    if value.numel() != 1 or value.is_complex():
                        return f"a parameter's 'step' is a tensor of shape {list(value.shape)}"
                elif value.shape != p.shape:
                    return (
                        f"a parameter's '{key}' has shape {list(value.shape)}, the parameter "
                        f"{list(p.shape)}"
                    )
    return None


def _fit_problem(model, state: dict) -> str | None:
    """Why ``state`` cannot be loaded into ``model`` (keys or shapes differ), or
    ``None``."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "it is not a dict of tensors"
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
    return "; ".join(problems) if problems else None


def check_start_ranks(model, starts: dict, path: Path) -> None:
    """The start ranks a checkpoint saved (progressive rank) are one per rank of
    each layer they name that has ranks to cut."""
    modules = dict(model.named_modules())
    for name, ranks in starts.items():
        cuttable = getattr(modules.get(name), "cuttable_ranks", None)
        now = cuttable() if callable(cuttable) else None
        if now is None:
            continue
        count = len(ranks) if isinstance(ranks, (list, tuple)) else 1
        if count != len(list(now)):
            raise UserInputError(
                _malformed(
                    path,
                    f"'state.start_ranks' gives {count} ranks for {name}, "
                    f"which has {len(list(now))}",
                )
            )


def restore_state(model, state: dict) -> str | None:
    """Load ``state`` (a ``state_dict`` kept earlier, e.g. the best evaluated) into
    ``model``, all or nothing: ``None`` once loaded, else why it cannot be (keys or
    shapes differ, e.g. ranks cut since), the model left exactly as it was."""
    problem = _fit_problem(model, state)
    if problem is not None:
        return problem
    current = model.state_dict()
    kept = {k: v.detach().clone() for k, v in current.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # what the checks above did not foresee: nothing half-loaded
        model.load_state_dict(kept)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None
