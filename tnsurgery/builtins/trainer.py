"""The built-in training loop, registered as the ``"builtin"`` trainer.

A plugin like any other: nothing in tnsurgery's core imports this module; the
spec's ``training.trainer`` selects it through the registry. The loop is put
together from :mod:`tnsurgery.training.steps`: set up (what trains, optimizer,
resume from a checkpoint), then per step the recipes (observers frozen,
progressive unfreezing and rank), the loss and the update, TT hygiene,
evaluation with best-state keeping, logging and checkpoints; everything it
changed on the models is given back at the end.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tnsurgery.data import to_device
from tnsurgery.errors import UserInputError
from tnsurgery.hookspecs import hookimpl
from tnsurgery.manifest import Manifest, record, refresh_configs
from tnsurgery.matching import select
from tnsurgery.plugins import Registry
from tnsurgery.quant import set_observers
from tnsurgery.spec import Training
from tnsurgery.trainer import Trainer, TrainResult
from tnsurgery.training import recipes
from tnsurgery.training.checkpoints import (
    apply_checkpoint,
    check_own_dir,
    check_own_log,
    check_start_ranks,
    read_checkpoint,
    recipe,
    restore_state,
    save_checkpoint,
    trim_log,
    write_checkpoint,
)
from tnsurgery.training.distributed import (
    FSDP,
    ShardedRun,
    batch_sum,
    full_state,
    is_main_process,
    sum_over_ranks,
    under_torchrun,
)
from tnsurgery.training.losses import FeatureCapture, training_loss
from tnsurgery.training.steps import (
    autocast,
    batches_forever,
    evaluate,
    grad_scaler,
    init_distributed,
    lr_factor,
    make_optimizer,
    rank_world,
    restore_flags,
    set_trainable,
    split_labels,
    tensorboard_writer,
    train_mode,
    training_options,
)


@hookimpl
def register_trainers(register):
    """Register the built-in training loop."""
    register(Trainer("builtin", builtin_train, "tnsurgery's own loop."))


def builtin_train(
    model: nn.Module,
    spec_or_training: Any,
    teacher: nn.Module | None = None,
    *,
    registry: Registry | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """The built-in training loop (see :func:`tnsurgery.training.train`)."""
    opts = training_options(spec_or_training, registry)
    if opts.mode == "distill" and teacher is None:
        raise UserInputError("training: mode 'distill' needs the original model as teacher")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    loop = _Loop(model, opts, teacher, registry, progress)
    try:
        loop.setup(resume)
        for step in range(loop.state["step"], opts.steps):
            loop.step(step)
    finally:
        loop.close()
    return loop.finish()


class _Loop:
    """One run of the built-in loop: its state, and each phase as a method."""

    def __init__(self, model, opts: Training, teacher, registry, progress) -> None:
        self.model, self.opts, self.teacher = model, opts, teacher
        # under FSDP, model and teacher become sharded copies; the caller's are kept here
        self.caller, self.sharded = model, None
        self.registry, self.progress = registry, progress
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        manifest = Manifest.of(model)
        surgered = manifest.surgered_names() if manifest is not None else []
        self.names = sorted(surgered, key=lambda n: order.get(n, len(order)))
        # what training changes on the models is given back at the end (the teacher is
        # the caller's original model: it must come back as it was)
        self.saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        self.teacher_modes: list = []
        if teacher is not None:
            self.saved_flags += [(p, p.requires_grad) for p in teacher.parameters()]
            self.teacher_modes = [(m, m.training) for m in teacher.modules()]
        self.state: dict[str, Any] = {"step": 0, "best_metric": None, "best_step": None}
        self.result = TrainResult()
        self.best_state: dict | None = None
        self.plateau_scale = 1.0
        self.s_cap = self.t_cap = self.log = self.board = None
        self.log_created = self.logged = False
        self.ckpt_dir = Path(opts.checkpoint.dir) if opts.checkpoint else None
        if self.ckpt_dir is not None:
            check_own_dir(self.ckpt_dir)  # before any step, not at the first checkpoint
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ setup

    def setup(self, resume: bool) -> None:
        """What trains, the optimizer, a resumed state, the teacher frozen, feature
        captures, the log and the data."""
        model, opts = self.model, self.opts
        set_trainable(model, opts, self.names)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserInputError("training: no parameter to train (is the model surgered?)")
        self.optimizer = make_optimizer(opts, self.params)
        self.scaler = grad_scaler(opts, model)
        if resume and self.ckpt_dir is not None and (self.ckpt_dir / "last.pt").exists():
            self._resume()
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if opts.distributed == FSDP and under_torchrun():
            self._shard()
        else:
            init_distributed()
        self.rank, self.world = rank_world()
        self.runner: nn.Module = self.model
        if self.world > 1 and self.sharded is None:  # DDP: gradients averaged at each step
            self.runner = DistributedDataParallel(
                model, find_unused_parameters=bool(opts.unfreeze_stages)
            )
        self._capture_features()
        try:
            if opts.log and self.rank == 0:
                check_own_log(opts.log)
                # a log this run creates is removed at the end if no line went into it:
                # an empty file is not a log a later run may append to
                self.log_created = not Path(opts.log).exists()
                self.log = open(opts.log, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UserInputError(f"training: cannot write the log {opts.log}: {exc}") from None
        self.board = tensorboard_writer(opts.tensorboard) if self.rank == 0 else None
        self.t0 = time.perf_counter()
        self.batches = batches_forever(
            opts, model, self.registry, skip=self.state["step"], per_process=self.sharded is None
        )
        train_mode(self.model, opts)

    def _shard(self) -> None:
        """Train sharded copies of the model and the teacher (FSDP); the optimizer's
        state, resumed into the caller's model's optimizer, moves over."""
        run = ShardedRun(self.model, self.teacher, self.opts, self.optimizer)
        self.sharded = run
        self.model, self.teacher = run.model, run.teacher
        self.params, self.optimizer = run.params, run.optimizer
        if grad_scaler(self.opts, self.model) is not None:
            raise UserInputError(
                "training: amp with float16 loss scaling (a GPU without bfloat16) is not "
                "supported with distributed 'fsdp'"
            )

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        payload = read_checkpoint(path)
        saved = payload["state"].get("recipe")
        if saved is not None and saved != recipe(self.opts):
            raise UserInputError(
                f"training: {path} was written by a run with other "
                "options; give another checkpoint dir, or remove it to start afresh"
            )
        starts = payload["state"].get("start_ranks")
        if self.opts.progressive_rank is not None and starts:  # cut as the checkpoint was
            check_start_ranks(self.model, starts, path)
            self.model.__dict__["_start_ranks"] = dict(starts)
            # the checkpoint after step s holds the ranks of the stage of step s - 1 (a
            # stage beginning at step s cuts before that step, once resumed)
            recipes.shrink(self.model, self.names, self.opts, payload["state"]["step"] - 1)
            self._new_optimizer()
        self.state = apply_checkpoint(payload, self.model, self.optimizer, path)
        self.result.resumed_from = self.state["step"]
        if is_main_process():  # the process that writes the log (before any group exists)
            trim_log(self.opts.log, self.state["step"])
        self.result.losses = self.state.get("losses", [])
        self.result.evals = self.state.get("evals", [])
        self.plateau_scale = self.state.get("plateau_scale", 1.0)
        if self.scaler is not None and self.state.get("grad_scaler"):
            self.scaler.load_state_dict(self.state["grad_scaler"])
        self.best_state = self.state.get("best_state")

    def _new_optimizer(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.opts, self.params)

    def _capture_features(self) -> None:
        opts = self.opts
        features = opts.mode == "distill" and opts.distill.features == "surgered"
        matched = list(self.names) if features else []
        if opts.mode == "distill" and opts.distill.match:
            extra = select(self.model, opts.distill.match, [], [], (nn.Module,)).names
            matched += [n for n in extra if n not in matched]
        if matched:
            self.s_cap = FeatureCapture(self.model, matched, detach=False)
            if self.teacher is not None:
                self.t_cap = FeatureCapture(self.teacher, matched, detach=True)

    # ------------------------------------------------------------------- step

    def step(self, step: int) -> None:
        """One optimizer step, then what follows it (hygiene, evaluation, log,
        checkpoint)."""
        self._recipes(step)
        factor = lr_factor(self.opts, step) * self.plateau_scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr * factor
        loss, parts = self._update()
        done = step + 1
        metrics = {"step": done, "loss": loss, "lr": self.opts.lr * factor, **parts}
        metrics.update(recipes.tt_hygiene(self.model, self.opts.tt, done))
        if self._eval_due(done):
            self._evaluate(done, metrics)
        self._log(done, metrics)
        if self.progress and self.rank == 0:  # one process reports
            self.progress(done, self.opts.steps, metrics)
        if self.ckpt_dir is not None and (
            done % self.opts.checkpoint.every == 0 or done == self.opts.steps
        ):
            self._checkpoint(done)

    def _recipes(self, step: int) -> None:
        opts, model = self.opts, self.model
        if opts.freeze_observers_at is not None and step == opts.freeze_observers_at:
            set_observers(model, False)
        if opts.unfreeze_stages and opts.trainable == "surgered":
            recipes.unfreeze(model, self.names, opts, step)
        if opts.progressive_rank is not None and recipes.shrink_at(opts, step):
            if self.world > 1:
                raise UserInputError("training: progressive_rank is not supported with DDP")
            recipes.shrink(model, self.names, opts, step)
            self._new_optimizer()
            # a state of an earlier stage has other shapes: the best is of this stage
            self.best_state = None
            self.state["best_metric"] = self.state["best_step"] = None

    def _update(self) -> tuple[float, dict[str, float]]:
        opts, model = self.opts, self.model
        batch, share = next(self.batches), None
        if self.sharded is not None:  # this process's slice, its share of the loss
            batch, share = self.sharded.share(batch), batch_sum
        inputs, labels = split_labels(batch, opts.labels)
        inputs = to_device(inputs, model)
        with autocast(opts, model):
            loss, parts = training_loss(
                opts, self.runner, self.teacher, inputs, labels, self.s_cap, self.t_cap, share
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            # FSDP averages the gradients of the shares: times the processes, their sum
            (loss * self.world if share is not None else loss).backward()
            if opts.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, opts.grad_clip)
            self.optimizer.step()
        else:  # float16: scaled loss, gradients unscaled before clipping
            self.scaler.scale(loss).backward()
            if opts.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, opts.grad_clip)
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
            self.scaler.update()
        if self.sharded is not None:  # the global batch's loss, on every process
            parts = sum_over_ranks({**parts, "loss": float(loss.detach())})
            self.result.losses.append(parts.pop("loss"))
        else:
            self.result.losses.append(float(loss.detach()))
        return self.result.losses[-1], parts

    def _eval_due(self, done: int) -> bool:
        opts = self.opts
        return bool(
            opts.eval_every
            and opts.eval_data
            and (done % opts.eval_every == 0 or done == opts.steps)
        )

    def _evaluate(self, done: int, metrics: dict) -> None:
        opts = self.opts
        value = evaluate(self.model, self.teacher, opts, self.registry)
        train_mode(self.model, opts)
        metrics[opts.metric] = value
        self.result.evals.append({"step": done, opts.metric: value})
        best = self.state.get("best_metric")
        if best is None or value > best:
            self.state["best_metric"], self.state["best_step"] = value, done
            self.best_state = self._full_state()
        elif opts.scheduler == "plateau":
            self.plateau_scale *= opts.gamma

    def _log(self, done: int, metrics: dict) -> None:
        if self.log:
            self.log.write(json.dumps(metrics) + "\n")
            self.log.flush()
            self.logged = True
        if self.board is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.board.add_scalar(k, v, done)

    def _checkpoint(self, done: int) -> None:
        state = self.state
        state.update(step=done, losses=self.result.losses, evals=self.result.evals)
        state["start_ranks"] = self.model.__dict__.get("_start_ranks")
        state["recipe"] = recipe(self.opts)
        state["plateau_scale"] = self.plateau_scale
        state["grad_scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        if self.sharded is not None:  # gathered by every process, written by rank 0
            model_state, optimizer_state = self.sharded.checkpoint_states()
            if self.rank == 0:
                write_checkpoint(
                    self.ckpt_dir, model_state, optimizer_state, state, self.best_state
                )
        elif self.rank == 0:
            save_checkpoint(self.ckpt_dir, self.model, self.optimizer, state, self.best_state)
        if self.world > 1:  # no process resumes from a checkpoint not yet written
            dist.barrier()

    def _full_state(self) -> dict:
        """A copy of the whole state of the model being trained (gathered under FSDP)."""
        if self.sharded is not None:
            return full_state(self.model)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------- end

    def close(self) -> None:
        """Give back modes and flags, remove hooks, close the log (on any exit)."""
        self.model.eval()
        self.caller.eval()
        restore_flags(self.saved_flags, self.teacher_modes)
        known = {id(p) for p, _ in self.saved_flags}
        for p in self.model.parameters():  # parameters made during training (progressive rank)
            if id(p) not in known:
                p.requires_grad_(True)
        for cap in (self.s_cap, self.t_cap):
            if cap is not None:
                cap.remove()
        if self.log:
            self.log.close()
            if self.log_created and not self.logged:
                with contextlib.suppress(OSError):
                    Path(self.log.name).unlink()
        if self.board is not None:
            self.board.close()

    def finish(self) -> TrainResult:
        """The best state put back when asked (all of it, or the last state kept and
        the result saying why), configs refreshed, the run recorded. Under FSDP the
        trained weights are first gathered into the caller's model, on every process."""
        if self.sharded is not None:
            why = restore_state(self.caller, full_state(self.model))
            if why is not None:  # the copy has the caller's keys and shapes: never expected
                raise RuntimeError(f"training: the sharded model's state does not fit: {why}")
        model, opts, result, state = self.caller, self.opts, self.result, self.state
        result.best_metric = state.get("best_metric")
        result.best_step = state.get("best_step")
        if opts.keep_best:
            why = None
            if self.best_state is None:
                why = "no evaluation" if not result.evals else "no evaluated state to restore"
                if result.evals and opts.progressive_rank is not None:
                    why = "no evaluation since the last rank cut"
            else:
                why = restore_state(model, self.best_state)
                if why is not None:
                    why = (
                        f"the best state (step {result.best_step}, {opts.metric} "
                        f"{result.best_metric}) cannot be restored: {why}"
                    )
            if why is None:
                result.kept = "best"
            else:  # the model holds the last state: no best is reported for it
                result.kept_reason = why
                result.best_metric = result.best_step = None
        model.__dict__.pop("_start_ranks", None)
        refresh_configs(model)
        result.steps = opts.steps
        result.seconds = time.perf_counter() - self.t0
        record(model, "training", {**result.to_dict(), "options": opts.model_dump(mode="json")})
        return result
