"""Training on several devices with FSDP (``"distributed": "fsdp"``), under ``torchrun``.

Each process holds a shard of every parameter (``torch.distributed.fsdp.fully_shard``
on each block, then on the root) and of the optimizer state; the teacher is sharded
too (frozen), so neither model needs to fit one device. The run computes what the
single-process loop computes: every process reads the same global batches and takes
its own slice of each (the global batch and the number of steps are the spec's), and
computes its share of the global batch's loss (the losses' batch statistics summed
over the processes: :func:`batch_sum`), so that the shares add up to that loss and
the gradients FSDP averages, times the number of processes, are its gradients.

The caller's model is never sharded: the loop trains a copy (:class:`ShardedRun`)
built on the meta device, so no second copy of the weights is made in host memory,
and the trained weights are gathered back into the caller's model at the end, on
every process. Checkpoints are the single-process files (full state dicts, the
optimizer's indexed by parameter position), written by rank 0: a run resumes under
FSDP from a single-process checkpoint and the other way round.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tnsurgery.data import examples_in, slice_batch
from tnsurgery.errors import UserInputError
from tnsurgery.spec import Training
from tnsurgery.training.steps import make_optimizer

FSDP = "fsdp"
"""The ``training.distributed`` value that shards the models."""

LAUNCH = "torchrun --nproc_per_node N -m tnsurgery train SPEC MODEL"
"""How to launch a sharded run (N processes, one per device)."""

_FULL = StateDictOptions(full_state_dict=True)
_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it sets ``RANK`` and
    ``WORLD_SIZE``) or has joined a process group already."""
    if dist.is_available() and dist.is_initialized():
        return True
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this process is the one that prints and writes: rank 0 of the process
    group, or of ``torchrun``'s environment before the group is joined (or after it
    is left); a process on its own is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def join_process_group() -> torch.device:
    """Join the default process group if the caller has not (nccl where CUDA is, with
    this process's GPU ``cuda:LOCAL_RANK``; gloo on CPU); the device to train on."""
    if not dist.is_available():
        raise UserInputError("training: distributed 'fsdp' needs torch.distributed")
    if not dist.is_initialized():
        try:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        except (ValueError, RuntimeError) as exc:  # e.g. RANK set, but no MASTER_ADDR
            raise UserInputError(
                f"training: distributed 'fsdp' cannot join the process group ({exc}); "
                f"launch it with {LAUNCH}"
            ) from None
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def leave_process_group() -> None:
    """Leave the default process group (after training, before the process ends)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one, before the root: the blocks of the model's
    largest ``nn.ModuleList`` (a transformer's layers), else each direct child with
    parameters. A module that shares a parameter with the rest of the model (tied
    embeddings) is left to the root's group."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    largest = max(lists, key=_numel, default=None)
    parent = largest if largest is not None and _numel(largest) else model
    units = [m for m in parent.children() if _numel(m)]
    return [m for m in units if not _shares_parameters(m, model)]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shares_parameters(unit: nn.Module, model: nn.Module) -> bool:
    inside = {id(p) for p in unit.parameters()}
    everywhere = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    within = [id(p) for _, p in unit.named_parameters(remove_duplicate=False)]
    return len([i for i in everywhere if i in inside]) > len(within)


def sharded_copy(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """A copy of ``model`` sharded over ``mesh`` (each of :func:`shard_units`, then
    the root), its shards of the weights on ``device``; ``model`` is not changed.
    The copy is made on the meta device and filled from ``model``'s full state."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    twin = copy.deepcopy(model, memo)
    for unit in shard_units(twin):
        fully_shard(unit, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    twin.to_empty(device=device)
    set_model_state_dict(twin, model.state_dict(), options=_FULL)
    with torch.no_grad():  # every buffer, those state_dict leaves out included
        buffers = dict(model.named_buffers())
        for name, buf in twin.named_buffers():
            buf.copy_(buffers[name])
    return twin


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` of a sharded model on the CPU, the same on every
    process (each parameter gathered in turn: one full tensor at a time on the
    device; the buffers, which each process updates on its slice, rank 0's)."""
    state = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        elif isinstance(value, torch.Tensor):
            value = value.detach().clone()
            dist.broadcast(value, src=0)
        else:  # a module's extra state
            state[name] = copy.deepcopy(value)
            continue
        state[name] = value.detach().to("cpu", copy=True)
    return state


def indexed_optimizer_state(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's)
    keyed as ``Optimizer.state_dict`` keys it: by position in ``names``, the
    optimizer's parameters in order."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def named_optimizer_state(state: dict, names: list[str]) -> dict:
    """The other way round from :func:`indexed_optimizer_state`."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def rank_share(batch: Any, rank: int, world: int) -> Any:
    """This process's slice of a global ``batch`` (contiguous; the sizes of the
    slices differ by one at most)."""
    total = examples_in(batch)
    if total < world:
        raise UserInputError(
            f"training: a batch of {total} examples cannot be shared by {world} processes "
            f"(FSDP): give batch_size >= {world}, and data whose last batch has as many"
        )
    return slice_batch(batch, total * rank // world, total * (rank + 1) // world)


def batch_sum(value: torch.Tensor) -> torch.Tensor:
    """``value``, a statistic of this process's slice of the batch (a count, a sum of
    the teacher's outputs), summed over the processes; outside autograd."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each of ``values`` (this process's shares of the batch's losses) summed over
    the processes: the global batch's, the same on every process."""
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(local)
    return {k: float(v) for k, v in zip(keys, local.tolist(), strict=True)}


class ShardedRun:
    """The sharded copies one FSDP run trains (student, and teacher if any) and the
    optimizer over the student's shards, made from the caller's models and the plain
    optimizer over the caller's model (whose state, resumed from a checkpoint, moves over).

    Attributes:
        model: the sharded student.
        teacher: the sharded teacher (frozen), or ``None``.
        params: the student's trainable parameters, in the plain optimizer's order.
        names: their names (the optimizer state's keys in checkpoints).
        optimizer: the optimizer ``opts`` names, over ``params``.
        rank, world: this process's rank and the number of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        opts: Training,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        device = join_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh(device.type, (self.world,))
        self.model = sharded_copy(model, mesh, device)
        self.teacher = sharded_copy(teacher, mesh, device) if teacher is not None else None
        named = dict(self.model.named_parameters())
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [named[n] for n in self.names]
        self.optimizer = make_optimizer(opts, self.params)
        if optimizer.state:  # resumed: the plain optimizer's state, sharded
            saved = named_optimizer_state(optimizer.state_dict(), self.names)
            set_optimizer_state_dict(self.model, self.optimizer, saved, options=_FULL)

    def share(self, batch: Any) -> Any:
        """This process's slice of ``batch`` (:func:`rank_share`)."""
        return rank_share(batch, self.rank, self.world)

    def checkpoint_states(self) -> tuple[dict, dict]:
        """The full model and optimizer states, in the single-process checkpoint's
        format, on rank 0 (empty on the others); every process must call it."""
        model_state = get_model_state_dict(self.model, options=_FULL_ON_CPU)
        saved = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL_ON_CPU)
        if self.rank != 0:
            return {}, {}
        return model_state, indexed_optimizer_state(saved, self.names)
