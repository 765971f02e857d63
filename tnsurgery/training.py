"""Post-surgery training: label-free distillation from the original model, or fine-tuning.

:func:`train` runs the spec's ``training`` section on a surgered model:

- ``distill`` (default): the original model is the teacher (frozen, eval
  mode). Feature distillation matches the output of every surgered module to
  the output of the module it replaced, captured with hooks from the teacher
  on the same batch (normalized MSE), which needs no label; output
  distillation adds KL at temperature ``T`` (×T²) on classifier logits, or a
  normalized MSE on other outputs (embeddings, hidden states); with labels,
  the task loss is mixed in by ``alpha``.
- ``finetune``: the task loss alone (cross-entropy or MSE) on labelled batches.

Options: AdamW/Adam/SGD, cosine/step/plateau/constant schedules with linear
warmup, gradient clipping, seeds, which parameters train, QAT observers
frozen at a step, evaluation every N steps (mean cosine to the teacher, or
accuracy) with best-state keeping, metrics as JSON lines, and checkpoints
that resume exactly (model, optimizer, schedule, RNG and data position).

This module holds the options (the spec's ``training`` section) and the loop;
the losses are in :mod:`tnsurgery.losses`, checkpoint I/O in
:mod:`tnsurgery.checkpoints`, and the staged recipes (progressive rank and
unfreezing, TT hygiene) in :mod:`tnsurgery.recipes`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tnsurgery.calibration import _to_device
from tnsurgery.checkpoints import (
    apply_checkpoint,
    read_checkpoint,
    recipe,
    refresh_configs,
    save_checkpoint,
    trim_log,
)
from tnsurgery.errors import UserInputError
from tnsurgery.hookspecs import hookimpl
from tnsurgery.losses import (
    FeatureCapture,
    main_tensor,
    pooled,
    training_loss,
)
from tnsurgery.recipes import shrink, shrink_at, tt_hygiene, unfreeze
from tnsurgery.tracing import call_model

# --------------------------------------------------------------------- spec


class DistillOptions(BaseModel):
    """How the student is matched to the teacher (``mode: distill``)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(4.0, gt=0, description="Softmax temperature of logit KL.")
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of distillation vs the task loss when batches carry labels.",
    )
    features: Literal["surgered", "none"] = Field(
        "surgered",
        description="'surgered': match each surgered module's output to the teacher's "
        "module it replaced (label-free); 'none': outputs only.",
    )
    output: Literal["auto", "kl", "mse", "cosine", "none"] = Field(
        "auto",
        description="Loss on the model outputs: 'kl' (logits at the temperature), 'mse' "
        "(normalized), 'cosine' (1 - cosine of per-example vectors, sequence outputs "
        "mean-pooled over real tokens: sentence embeddings), 'auto': kl for a 2-D output "
        "tensor, mse otherwise.",
    )
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature loss.")
    match: list[str] = Field(
        default_factory=list,
        description="Also match the outputs of these modules (spec patterns, e.g. "
        "'encoder.layer.*': every transformer block's hidden state) to the teacher's.",
    )


class CheckpointOptions(BaseModel):
    """Where and how often to save a resumable state."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(100, ge=1, description="Save every this many steps (and at the end).")
    dir: str = Field("checkpoints", description="Directory of the checkpoints.")


class TTOptions(BaseModel):
    """Hygiene of TT layers during training (the TT literature's stabilizers)."""

    model_config = ConfigDict(extra="forbid")

    clip_core_norm: float | None = Field(
        None, gt=0, description="After each step, scale down any core whose norm exceeds this."
    )
    normalize_cores: bool = Field(
        False,
        description="After each step, give every core the same norm (the weight unchanged).",
    )
    reorthogonalize_every: int | None = Field(
        None, ge=1, description="Put the cores in left-canonical form every this many steps."
    )
    log_stats_every: int | None = Field(
        None, ge=1, description="Add tt_stats() of every TT layer to the metrics this often."
    )


class ProgressiveRank(BaseModel):
    """Progressive rank: the surgered layers start at the ranks the spec built and are
    cut to ``final`` of them over ``stages`` equal stages (geometric steps)."""

    model_config = ConfigDict(extra="forbid")

    final: float = Field(..., gt=0, lt=1, description="Final ranks, as a fraction of the start.")
    stages: int = Field(3, ge=2, description="Stages (the first trains at the start ranks).")


class Training(BaseModel):
    """The spec's ``training`` section (every option has a default but ``data``)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["distill", "finetune"] = Field("distill", description="distill or finetune.")
    data: dict[str, Any] = Field(..., description="Training batches (same sources as calibration).")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    scheduler: Literal["cosine", "step", "plateau", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    step_size: int = Field(100, ge=1, description="'step' schedule: decay every this many steps.")
    gamma: float = Field(0.5, gt=0, le=1, description="'step'/'plateau': decay factor.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (null: none).")
    seed: int = Field(0, description="Seed of the run (initial RNG state, data order).")
    trainable: Literal["surgered", "all"] = Field(
        "surgered",
        description="'surgered': only the layers surgery made train (the rest frozen); "
        "'all': every parameter.",
    )
    loss: Literal["cross_entropy", "mse"] = Field(
        "cross_entropy", description="Task loss when batches carry labels."
    )
    labels: str | int | None = Field(
        None,
        description="Where a batch holds its labels: a key of a dict batch, or the index of "
        "a tuple batch (e.g. -1); null: no labels (distillation only).",
    )
    distill: DistillOptions = Field(default_factory=DistillOptions)
    freeze_observers_at: int | None = Field(
        None, ge=0, description="QAT: step at which observers stop updating (scales frozen)."
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every this many steps.")
    eval_data: dict[str, Any] | None = Field(
        None, description="Evaluation batches (default: none; then the metric is skipped)."
    )
    metric: Literal["cosine", "accuracy"] = Field(
        "cosine",
        description="'cosine': mean cosine of outputs to the teacher's; 'accuracy': of the "
        "argmax against labels.",
    )
    keep_best: bool = Field(True, description="End with the best evaluated state.")
    dropout: bool = Field(
        False,
        description="Train with the model in training mode (dropout on, batch-norm "
        "statistics updating). Off by default: the student then computes exactly what the "
        "teacher's layers are matched against (QAT observers still update).",
    )
    checkpoint: CheckpointOptions | None = Field(None, description="Resumable checkpoints.")
    log: str | None = Field(None, description="Write metrics as JSON lines to this file.")
    unfreeze_stages: int | None = Field(
        None,
        ge=1,
        description="Progressive unfreezing: split the steps into this many stages; stage k "
        "trains the last k/N of the surgered layers (in call order), last layers first.",
    )
    tt: TTOptions = Field(default_factory=TTOptions, description="TT layer hygiene.")
    progressive_rank: ProgressiveRank | None = Field(
        None,
        description="Start at the ranks surgery built and truncate (LowRankLinear) or "
        "TT-round (TTLinear) them down in stages to a final fraction, training at each stage.",
    )
    order: Literal["compress_then_distill", "distill_then_compress"] = Field(
        "compress_then_distill",
        description="With surgery.apply / tnsurgery apply: 'compress_then_distill' trains the "
        "surgered model, starting from the factors surgery built; 'distill_then_compress' "
        "trains the dense model first (every parameter; distilled from a teacher given to "
        "apply, or fine-tuned on labels), then compresses the trained model (calibration "
        "runs on it). Compressing while distilling is 'progressive_rank'.",
    )
    trainer: str = Field(
        "builtin",
        description="Which trainer runs this section: 'builtin', or one a plugin registers "
        "(register_trainers), e.g. a Lightning or Accelerate loop.",
    )
    amp: bool = Field(
        False,
        description="Mixed precision: forward passes under autocast (bfloat16 on CPU and on "
        "GPUs that support it, else float16 with loss scaling); the weights and the "
        "optimizer stay in float32.",
    )
    tensorboard: str | None = Field(
        None, description="Also write the metrics as TensorBoard scalars to this directory."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Training:
        problems = []
        if self.mode == "finetune" and self.labels is None:
            problems.append("mode 'finetune' needs 'labels' (where batches hold them)")
        if self.metric == "accuracy" and self.eval_every and self.labels is None:
            problems.append("metric 'accuracy' needs 'labels'")
        if self.eval_every and self.eval_data is None:
            problems.append("'eval_every' needs 'eval_data'")
        if self.scheduler == "plateau" and not self.eval_every:
            problems.append("scheduler 'plateau' follows evaluations: set 'eval_every'")
        if self.unfreeze_stages and self.trainable == "all":
            problems.append("'unfreeze_stages' unfreezes surgered layers: use trainable 'surgered'")
        if self.order == "distill_then_compress":
            for name in ("unfreeze_stages", "progressive_rank"):
                if getattr(self, name) is not None:
                    problems.append(
                        f"'{name}' acts on surgered layers: it needs order 'compress_then_distill'"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ------------------------------------------------------------------ helpers


def _split_labels(batch: Any, where: str | int | None) -> tuple[Any, torch.Tensor | None]:
    if where is None:
        return batch, None
    if isinstance(batch, dict) and isinstance(where, str):
        rest = {k: v for k, v in batch.items() if k != where}
        return rest, batch.get(where)
    if isinstance(batch, (tuple, list)) and isinstance(where, int):
        items = list(batch)
        label = items.pop(where)
        return (items[0] if len(items) == 1 else tuple(items)), label
    raise UserInputError(f"training: labels={where!r} does not fit a {type(batch).__name__} batch")


def _lr_factor(opts: Training, step: int) -> float:
    """Multiplier of ``lr`` at ``step`` (0-based) for warmup + cosine/step/constant."""
    if opts.warmup_steps and step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    after = step - opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    if opts.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    if opts.scheduler == "step":
        return opts.gamma ** (after // opts.step_size)
    return 1.0  # constant, and plateau (driven by evaluations)


@dataclass
class TrainResult:
    """What :func:`train` did: steps, losses, evaluations, timing, best state."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    resumed_from: int | None = None

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
        }


# ------------------------------------------------------------------ trainer


def surgered_names(model: nn.Module) -> list[str]:
    """Names of the modules surgery made (from the manifest attached to ``model``)."""
    from tnsurgery.surgery import get_manifest

    manifest = get_manifest(model) or {}
    names: list[str] = []
    for record in [*manifest.get("history", []), manifest]:
        names += [r["name"] for r in record.get("replacements", [])]
    return list(dict.fromkeys(names))


def _batches_forever(opts: Training, model: nn.Module, registry, skip: int) -> Iterator[Any]:
    """Cycle over the training data; ``skip`` batches are passed over (resume)."""
    from tnsurgery import data as data_mod

    rank, world = _dist_rank_world()
    epoch, seen = 0, 0
    while True:
        got = False
        for index, batch in enumerate(
            data_mod.batches(
                opts.data, model, opts.batch_size, None, opts.seed + epoch, registry=registry
            )
        ):
            if index % world != rank:  # each process its own share of the batches
                continue
            got = True
            if seen < skip:
                seen += 1
                continue
            seen += 1
            yield batch
        if not got:
            raise UserInputError("training: the data source gave no batch")
        epoch += 1


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group (gloo on CPU,
    nccl on CUDA) if the caller has not."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@dataclass(frozen=True)
class Trainer:
    """A training loop, as a plugin registers it (``register_trainers`` hook).

    Attributes:
        name: the ``training.trainer`` value that selects it.
        train: ``train(model, training, teacher, *, registry, progress, resume)``
            with the arguments of :func:`train` (``training`` a validated
            :class:`Training`); returns a :class:`TrainResult`.
        description: one line for ``tnsurgery plugins``.
    """

    name: str
    train: Callable[..., TrainResult]
    description: str = ""


def train(
    model: nn.Module,
    spec_or_training: Any,
    teacher: nn.Module | None = None,
    *,
    registry=None,
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
        progress: ``progress(step, steps, metrics)`` after each step.
        resume: continue from the latest checkpoint in ``checkpoint.dir`` if any.

    Returns:
        A :class:`TrainResult`; it is also recorded in the model's manifest
        under ``"training"``. ``training.trainer`` picks the loop: the built-in
        one (:func:`builtin_train`) or a plugin's.
    """
    from tnsurgery.plugins import get_registry

    opts = _training_options(spec_or_training, registry)
    registry = registry or get_registry()
    try:
        trainer = registry.get_trainer(opts.trainer)
    except KeyError as exc:
        raise UserInputError(f"training: field 'trainer': {exc.args[0]}") from None
    return trainer.train(model, opts, teacher, registry=registry, progress=progress, resume=resume)


@hookimpl
def register_trainers(register):
    """Register the built-in training loop."""
    register(Trainer("builtin", builtin_train, "tnsurgery's own loop (this module)."))


def builtin_train(
    model: nn.Module,
    spec_or_training: Any,
    teacher: nn.Module | None = None,
    *,
    registry=None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """The built-in training loop (see the module docstring and :func:`train`)."""
    opts = _training_options(spec_or_training, registry)
    if opts.mode == "distill" and teacher is None:
        raise UserInputError("training: mode 'distill' needs the original model as teacher")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names = sorted(surgered_names(model), key=lambda n: order.get(n, len(order)))
    # what training changes on the models is given back at the end (the teacher is
    # the caller's original model: it must come back as it was)
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    if teacher is not None:
        saved_flags += [(p, p.requires_grad) for p in teacher.parameters()]
        teacher_modes = [(m, m.training) for m in teacher.modules()]
    else:
        teacher_modes = []
    _set_trainable(model, opts, names)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        _restore(saved_flags, teacher_modes)
        raise UserInputError("training: no parameter to train (is the model surgered?)")
    s_cap = t_cap = log = board = None
    try:
        optimizer = _optimizer(opts, params)
        scaler = _grad_scaler(opts, model)
        plateau_scale = 1.0
        state: dict[str, Any] = {"step": 0, "best_metric": None, "best_step": None}
        result = TrainResult()
        ckpt_dir = Path(opts.checkpoint.dir) if opts.checkpoint else None
        if resume and ckpt_dir is not None and (ckpt_dir / "last.pt").exists():
            payload = read_checkpoint(ckpt_dir / "last.pt")
            saved = payload["state"].get("recipe")
            if saved is not None and saved != recipe(opts):
                raise UserInputError(
                    f"training: {ckpt_dir / 'last.pt'} was written by a run with other "
                    "options; give another checkpoint dir, or remove it to start afresh"
                )
            starts = payload["state"].get("start_ranks")
            if opts.progressive_rank is not None and starts:  # cut as the checkpoint was
                model.__dict__["_start_ranks"] = dict(starts)
                shrink(model, names, opts, payload["state"]["step"])
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = _optimizer(opts, params)
            state = apply_checkpoint(payload, model, optimizer)
            result.resumed_from = state["step"]
            trim_log(opts.log, state["step"])
            result.losses = state.get("losses", [])
            result.evals = state.get("evals", [])
            plateau_scale = state.get("plateau_scale", 1.0)
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
        best_state = state.get("best_state")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        _maybe_init_distributed()
        rank, world = _dist_rank_world()
        runner: nn.Module = model
        if world > 1:  # gradients averaged over the processes at each step
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(
                model, find_unused_parameters=bool(opts.unfreeze_stages)
            )
        features = opts.mode == "distill" and opts.distill.features == "surgered"
        matched = list(names) if features else []
        if opts.mode == "distill" and opts.distill.match:
            from tnsurgery.matching import select

            extra = select(model, opts.distill.match, [], [], (nn.Module,)).names
            matched += [n for n in extra if n not in matched]
        s_cap = FeatureCapture(model, matched, detach=False) if matched else None
        t_cap = (
            FeatureCapture(teacher, matched, detach=True)
            if matched and teacher is not None
            else None
        )
        try:
            log = open(opts.log, "a", encoding="utf-8") if opts.log and rank == 0 else None  # noqa: SIM115
        except OSError as exc:
            raise UserInputError(f"training: cannot write the log {opts.log}: {exc}") from None
        board = _tensorboard(opts.tensorboard) if rank == 0 else None
        start, t0 = state["step"], time.perf_counter()
        batches = _batches_forever(opts, model, registry, skip=start)
        _train_mode(model, opts)
        for step in range(start, opts.steps):
            if opts.freeze_observers_at is not None and step == opts.freeze_observers_at:
                from tnsurgery.quant import set_observers

                set_observers(model, False)
            if opts.unfreeze_stages and opts.trainable == "surgered":
                unfreeze(model, names, opts, step)
            if opts.progressive_rank is not None and shrink_at(opts, step):
                if world > 1:
                    raise UserInputError("training: progressive_rank is not supported with DDP")
                shrink(model, names, opts, step)
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = _optimizer(opts, params)
                # a state of an earlier stage has other shapes: the best is of this stage
                best_state = None
                state["best_metric"] = state["best_step"] = None
            factor = _lr_factor(opts, step) * plateau_scale
            for group in optimizer.param_groups:
                group["lr"] = opts.lr * factor
            inputs, labels = _split_labels(next(batches), opts.labels)
            inputs = _to_device(inputs, model)
            with _autocast(opts, model):
                loss, parts = training_loss(opts, runner, teacher, inputs, labels, s_cap, t_cap)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                if opts.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                optimizer.step()
            else:  # float16: scaled loss, gradients unscaled before clipping
                scaler.scale(loss).backward()
                if opts.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            result.losses.append(float(loss.detach()))
            metrics = {"step": step + 1, "loss": result.losses[-1], "lr": opts.lr * factor, **parts}
            metrics.update(tt_hygiene(model, opts.tt, step + 1))
            done = step + 1
            if (
                opts.eval_every
                and opts.eval_data
                and (done % opts.eval_every == 0 or done == opts.steps)
            ):
                value = evaluate(model, teacher, opts, registry)
                _train_mode(model, opts)
                metrics[opts.metric] = value
                result.evals.append({"step": done, opts.metric: value})
                best = state.get("best_metric")
                if best is None or value > best:
                    state["best_metric"], state["best_step"] = value, done
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                elif opts.scheduler == "plateau":
                    plateau_scale *= opts.gamma
            if log:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if board is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and k != "step":
                        board.add_scalar(k, v, done)
            if progress:
                progress(done, opts.steps, metrics)
            if ckpt_dir is not None and (done % opts.checkpoint.every == 0 or done == opts.steps):
                state.update(step=done, losses=result.losses, evals=result.evals)
                state["start_ranks"] = model.__dict__.get("_start_ranks")
                state["recipe"] = recipe(opts)
                state["plateau_scale"] = plateau_scale
                state["grad_scaler"] = scaler.state_dict() if scaler is not None else None
                if rank == 0:
                    save_checkpoint(ckpt_dir, model, optimizer, state, best_state)
                if world > 1:  # no process resumes from a checkpoint not yet written
                    import torch.distributed as dist

                    dist.barrier()
    finally:
        model.eval()
        _restore(saved_flags, teacher_modes)
        known = {id(p) for p, _ in saved_flags}
        for p in model.parameters():  # parameters made during training (progressive rank)
            if id(p) not in known:
                p.requires_grad_(True)
        for cap in (s_cap, t_cap):
            if cap is not None:
                cap.remove()
        if log:
            log.close()
        if board is not None:
            board.close()
    if opts.keep_best and best_state is not None:
        try:
            model.load_state_dict(best_state)
        except RuntimeError:  # shapes changed since (progressive rank): keep the last state
            pass
    model.__dict__.pop("_start_ranks", None)
    refresh_configs(model)
    result.steps = opts.steps
    result.seconds = time.perf_counter() - t0
    result.best_metric, result.best_step = state.get("best_metric"), state.get("best_step")
    _record(model, opts, result)
    return result


def _autocast(opts: Training, model: nn.Module):
    """Autocast for the forward passes when ``amp`` is on (a no-op context otherwise)."""
    import contextlib

    if not opts.amp:
        return contextlib.nullcontext()
    ref = next(iter(model.parameters()))
    if ref.device.type == "cuda":
        return torch.autocast("cuda", dtype=_cuda_amp_dtype())
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _cuda_amp_dtype() -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _grad_scaler(opts: Training, model: nn.Module):
    """A loss scaler for float16 autocast on CUDA (whose small gradients underflow);
    ``None`` otherwise (float32, or bfloat16, which has float32's exponent range)."""
    ref = next(iter(model.parameters()), None)
    if not opts.amp or ref is None or ref.device.type != "cuda":
        return None
    if _cuda_amp_dtype() != torch.float16:
        return None
    if any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        return None  # float16 weights: a scaler cannot unscale their gradients
    return torch.amp.GradScaler("cuda")


def _tensorboard(directory: str | None):
    """A TensorBoard writer, or ``None`` (with a clear error if asked for but missing)."""
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserInputError(
            "training: 'tensorboard' needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(directory)


def _train_mode(model: nn.Module, opts: Training) -> None:
    """Training mode as ``dropout`` says; quantization observers always train."""
    from tnsurgery.quant import FakeQuantizer

    model.train(opts.dropout)
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.train()


def _restore(flags: list, modes: list) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, mode in modes:
        m.training = mode


def _training_options(source: Any, registry) -> Training:
    if isinstance(source, Training):
        return source
    if isinstance(source, dict) and "rules" not in source:
        return Training.model_validate(source)
    from tnsurgery.spec import load_spec

    spec = load_spec(source, registry)
    if spec.training is None:
        raise UserInputError("the spec has no 'training' section")
    return spec.training


def _set_trainable(model: nn.Module, opts: Training, names: list[str]) -> None:
    if opts.trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        if name in modules:
            for p in modules[name].parameters():
                p.requires_grad_(True)


def _optimizer(opts: Training, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
        )
    cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=opts.lr, weight_decay=opts.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, teacher: nn.Module | None, opts: Training, registry=None) -> float:
    """The metric on ``eval_data``: mean cosine of (mean-pooled) outputs to the
    teacher's, or accuracy against labels."""
    from tnsurgery import data as data_mod

    model.eval()
    total, count = 0.0, 0
    for batch in data_mod.batches(
        opts.eval_data, model, opts.batch_size, None, opts.seed, registry=registry
    ):
        inputs, labels = _split_labels(batch, opts.labels)
        inputs = _to_device(inputs, model)
        out = main_tensor(call_model(model, inputs))
        if opts.metric == "accuracy":
            if labels is None:
                raise UserInputError("training: metric 'accuracy' needs labels")
            total += float((out.argmax(-1).cpu() == labels.reshape(out.shape[:-1])).sum())
            count += int(labels.numel())
            continue
        if teacher is None:
            raise UserInputError("training: metric 'cosine' needs the teacher")
        ref = main_tensor(call_model(teacher, inputs))
        a, b = pooled(out, inputs), pooled(ref, inputs)
        total += float(F.cosine_similarity(a.float(), b.float(), dim=-1).sum())
        count += a.shape[0]
    return total / max(count, 1)


def _record(model: nn.Module, opts: Training, result: TrainResult) -> None:
    from tnsurgery.surgery import MANIFEST_ATTR, get_manifest

    manifest = get_manifest(model)
    if manifest is None:
        return
    manifest = dict(manifest)
    manifest["training"] = {**result.to_dict(), "options": opts.model_dump(mode="json")}
    object.__setattr__(model, MANIFEST_ATTR, manifest)
