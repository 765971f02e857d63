"""Calibration one block at a time: the calibration samples' hidden states carried
from block to block, on two streams.

The samples run through the modules before the stack once (:func:`start`). Then,
for each block, the *original* stream (the hidden states the original blocks give)
feeds the original block: its targets' input second moments are collected there
(:func:`block_stats`), exactly the statistics a whole-model calibration collects.
The *surgered* stream (the hidden states the blocks surgered so far give) feeds the
surgered block, on which the sequential refit re-solves each replacement for the
inputs it now receives (:func:`refit_block`, through
:func:`tnsurgery.calibration.refit_rule`). Each block's outputs on both streams then
become the next block's inputs (:func:`advance`). Peak memory: one block (original
and surgered) plus the two streams' hidden states (on the device where they fit,
else in host memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnsurgery.blocks import BlockCall, Captured, run_block
from tnsurgery.calibration import CalibrationResult, collect, padding_mask, refit_rule
from tnsurgery.data import batches
from tnsurgery.errors import UserInputError
from tnsurgery.plan import TargetPlan
from tnsurgery.plugins import Registry
from tnsurgery.spec import Spec
from tnsurgery.transform import Transform

__all__ = [
    "OnStream",
    "Streams",
    "advance",
    "block_stats",
    "calibration_batches",
    "refit_block",
    "run_on",
    "start",
]


def calibration_batches(spec: Spec, model: nn.Module, registry: Registry) -> list[Any]:
    """The spec's calibration batches, as a whole-model calibration draws them."""
    cal = spec.calibration
    try:
        drawn = list(
            batches(cal.data, model, cal.batch_size, cal.samples, cal.seed, registry=registry)
        )
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"calibration: reading the data failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not drawn:
        raise UserInputError("calibration: the data gave no batch")
    return drawn


@dataclass
class Streams:
    """The calibration batches' block inputs: what the model gives every block
    (``captured``), and the hidden states of the original and surgered streams."""

    data: list[Any]
    captured: list[Captured]
    original: list[torch.Tensor]
    surgered: list[torch.Tensor]
    seconds: float = 0.0
    stats_layers: int = 0
    report: dict[str, Any] = field(
        default_factory=lambda: {"groups": 0, "refitted": 0, "not_refittable": 0, "seconds": 0.0}
    )

    def examples(self) -> int:
        """Examples in all."""
        return sum(int(h.shape[0]) for h in self.original)

    def describe(self) -> dict[str, Any]:
        """The plan's ``calibration`` entry."""
        return {
            "examples": self.examples(),
            "batches": len(self.data),
            "seconds": round(self.seconds, 3),
            "layers": self.stats_layers,
            "pipeline": "blocks",
        }


def start(data: list[Any], captured: list[Captured]) -> Streams:
    """Both streams at the first block's input, kept on the device where they fit
    (both streams in at most a quarter of the device's free memory), else in host
    memory, each batch moved to the device for its block's run."""
    hidden = [c.hidden for c in captured]
    device = hidden[0].device
    if device.type == "cuda":
        needed = 2 * sum(h.numel() * h.element_size() for h in hidden)
        free, _ = torch.cuda.mem_get_info(device)
        if needed > free // 4:
            hidden = [h.to("cpu") for h in hidden]
    return Streams(data, captured, list(hidden), list(hidden))


def run_on(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """``run_block`` with the hidden states moved to the block's device and the output
    kept where the stream is."""
    ref = next(iter(block.parameters()), None)
    device = ref.device if ref is not None else hidden.device
    return run_block(block, call, hidden.to(device)).to(hidden.device)


class OnStream(nn.Module):
    """A block at its full name inside an empty root (so its modules keep their names
    in the model), whose forward runs the block on one stream's hidden states of
    calibration batch ``index``."""

    def __init__(self, name: str, block: nn.Module, calls: list[BlockCall], hidden: list) -> None:
        super().__init__()
        parent: nn.Module = self
        parts = name.split(".")
        for part in parts[:-1]:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], block)
        object.__setattr__(self, "_block", block)
        self._calls, self._hidden = calls, hidden

    def forward(self, index: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        """The block's output on batch ``index`` of the stream (``attention_mask`` is
        read by the hooks that leave padding out, not here)."""
        b = int(index)
        return run_on(self._block, self._calls[b], self._hidden[b])


def _indexed(streams: Streams, device: torch.device) -> list[dict[str, Any]]:
    """One small batch per calibration batch: its index, and its padding mask."""
    out = []
    for b, batch in enumerate(streams.data):
        item: dict[str, Any] = {"index": torch.tensor(b)}
        mask = padding_mask(batch)
        if mask is not None:
            item["attention_mask"] = mask.to(device)
        out.append(item)
    return out


def _calls(streams: Streams, i: int) -> list[BlockCall]:
    return [c.calls[i] for c in streams.captured]


def block_stats(
    streams: Streams, i: int, name: str, original: nn.Module, targets: list[str], device
) -> CalibrationResult:
    """The input second moments of ``targets`` (full names, inside block ``i`` named
    ``name``) on the original stream."""
    t0 = time.perf_counter()
    root = OnStream(name, original, _calls(streams, i), streams.original)
    result = collect(root, targets, _indexed(streams, device), keep_batches=True)
    streams.seconds += time.perf_counter() - t0
    streams.stats_layers += len(result.stats)
    return result


def refit_block(
    streams: Streams,
    i: int,
    name: str,
    original: nn.Module,
    work: nn.Module,
    transform: Transform,
    index: int,
    todo: list[TargetPlan],
    stats: CalibrationResult,
    damping: float,
) -> None:
    """The sequential refit of rule ``index``'s replacements in block ``i``: the
    original block on the original stream, the surgered one on the surgered stream."""
    calls = _calls(streams, i)
    root_o = OnStream(name, original, calls, streams.original)
    root_s = OnStream(name, work, calls, streams.surgered)
    refit_rule(root_o, root_s, transform, index, todo, stats, damping, None, streams.report)


def advance(streams: Streams, i: int, original: nn.Module, work: nn.Module) -> None:
    """Both streams through block ``i``: its outputs become the next block's inputs."""
    for b, cap in enumerate(streams.captured):
        call = cap.calls[i]
        streams.original[b] = run_on(original, call, streams.original[b])
        streams.surgered[b] = run_on(work, call, streams.surgered[b])
