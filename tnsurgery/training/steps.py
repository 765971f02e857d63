"""The pieces of a training loop, each small and testable: labels, the learning-rate
schedule, batches that cycle and resume, optimizer, autocast and loss scaling, which
parameters train, evaluation. The built-in loop
(:mod:`tnsurgery.builtins.trainer`) is put together from them, and a plugin's loop
may use them too."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tnsurgery.data import batches, to_device
from tnsurgery.errors import UserInputError
from tnsurgery.quant import FakeQuantizer
from tnsurgery.spec import Training, load_spec
from tnsurgery.tracing import call_model
from tnsurgery.training.losses import main_tensor, pooled


def split_labels(batch: Any, where: str | int | None) -> tuple[Any, torch.Tensor | None]:
    """The batch's inputs and its labels (``where``: a dict key or a tuple index)."""
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


def lr_factor(opts: Training, step: int) -> float:
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


def batches_forever(
    opts: Training, model: nn.Module, registry, skip: int, *, per_process: bool = True
) -> Iterator[Any]:
    """Cycle over the training data; ``skip`` batches are passed over (resume). Under
    torch.distributed each process takes its own share of the batches (DDP), or with
    ``per_process`` off every process gets every batch (FSDP, which slices each)."""
    rank, world = rank_world() if per_process else (0, 1)
    epoch, seen = 0, 0
    while True:
        got = False
        for index, batch in enumerate(
            batches(opts.data, model, opts.batch_size, None, opts.seed + epoch, registry=registry)
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


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group (gloo on CPU,
    nccl on CUDA) if the caller has not."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def autocast(opts: Training, model: nn.Module):
    """Autocast for the forward passes when ``amp`` is on (a no-op context otherwise)."""
    if not opts.amp:
        return contextlib.nullcontext()
    ref = next(iter(model.parameters()))
    if ref.device.type == "cuda":
        return torch.autocast("cuda", dtype=cuda_amp_dtype())
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cuda_amp_dtype() -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def grad_scaler(opts: Training, model: nn.Module):
    """A loss scaler for float16 autocast on CUDA (whose small gradients underflow);
    ``None`` otherwise (float32, or bfloat16, which has float32's exponent range)."""
    ref = next(iter(model.parameters()), None)
    if not opts.amp or ref is None or ref.device.type != "cuda":
        return None
    if cuda_amp_dtype() != torch.float16:
        return None
    if any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        return None  # float16 weights: a scaler cannot unscale their gradients
    return torch.amp.GradScaler("cuda")


TENSORBOARD_EVENTS = "events.out.tfevents."
"""How the names of the event files a TensorBoard writer makes begin."""


def check_own_tensorboard(directory: str | Path) -> None:
    """A TensorBoard directory that exists must hold only TensorBoard event files (a
    spec names it: it may not make training write into someone else's directory);
    a symlink or a non-directory is refused."""
    d = Path(directory)
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise UserInputError(f"training: the tensorboard dir {d} is not a directory")
    if not d.exists():
        return
    try:
        others = [
            p.name
            for p in d.iterdir()
            if not p.name.startswith(TENSORBOARD_EVENTS) or p.is_symlink() or not p.is_file()
        ]
    except OSError as exc:
        raise UserInputError(f"training: cannot read the tensorboard dir {d}: {exc}") from None
    if others:
        raise UserInputError(
            f"training: the tensorboard dir {d} holds files that are not TensorBoard event "
            f"files ({', '.join(sorted(others)[:3])}): give a new or empty directory"
        )


def tensorboard_writer(directory: str | None):
    """A TensorBoard writer, or ``None`` (with a clear error if asked for but missing);
    the directory must be new or hold only event files (:func:`check_own_tensorboard`)."""
    if directory is None:
        return None
    check_own_tensorboard(directory)
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard
    except ImportError:
        raise UserInputError(
            "training: 'tensorboard' needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(directory)


def train_mode(model: nn.Module, opts: Training) -> None:
    """Training mode as ``dropout`` says; quantization observers always train."""
    model.train(opts.dropout)
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.train()


def restore_flags(flags: list, modes: list) -> None:
    """Give back ``requires_grad`` flags and train/eval modes as they were."""
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, mode in modes:
        m.training = mode


def training_options(source: Any, registry) -> Training:
    """The validated ``training`` section of a spec, or of a :class:`Training` / dict."""
    if isinstance(source, Training):
        return source
    if isinstance(source, dict) and "rules" not in source:
        return Training.model_validate(source)
    spec = load_spec(source, registry)
    if spec.training is None:
        raise UserInputError("the spec has no 'training' section")
    return spec.training


def set_trainable(model: nn.Module, opts: Training, names: list[str]) -> None:
    """``requires_grad`` as ``trainable`` says: every parameter, or the surgered layers'."""
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


def make_optimizer(opts: Training, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``opts`` names, over ``params``."""
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
    model.eval()
    total, count = 0.0, 0
    for batch in batches(
        opts.eval_data, model, opts.batch_size, None, opts.seed, registry=registry
    ):
        inputs, labels = split_labels(batch, opts.labels)
        inputs = to_device(inputs, model)
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
