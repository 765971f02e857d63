"""A global budget, streamed: the per-layer statistics gathered block by block, then
the allocation, before the blocks are read again to be surgered.

:func:`tnsurgery.budget.allocate` needs every layer's error curve and sensitivity
before it can choose. Streamed, a first pass reads each block once, on the original
stream only: its targets' input moments on the calibration data (when the spec has
some), each target's error curve (the transform's plan at every candidate ratio,
with those moments: :func:`tnsurgery.budget.layer_curve`), and its sensitivity, the
damage to the *block's* output on the sample input when that layer alone is replaced
(the in-memory budget measures the model's output: a whole model cannot be run per
layer when it is read one block at a time, so each layer is weighed by what it does
to its block). The block is then put back on the meta device. The allocation itself
is the in-memory one (:func:`tnsurgery.budget.assign`). The second pass is the
ordinary streamed surgery, each target with the params the allocation gave it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from tnsurgery.blocks import BlockStack, Captured, run_recorded
from tnsurgery.budget import (
    assign,
    layer_curve,
    output_vector,
    sensitivity,
    shared_reason,
    terms,
)
from tnsurgery.calibration import padding_mask
from tnsurgery.io.checkpoint import Weights
from tnsurgery.spec import Spec
from tnsurgery.streaming.calibrated import OnStream, block_stats, run_on, start
from tnsurgery.streaming.memory import give_back
from tnsurgery.targets import RuleTargets
from tnsurgery.tracing import sharing

__all__ = ["SENSITIVITY", "allocate_blocks"]

SENSITIVITY = "output error of the layer's block on the sample input (streamed, block by block)"


def allocate_blocks(
    model: nn.Module,
    spec: Spec,
    weights: Weights,
    device: torch.device,
    stack: BlockStack,
    targets: list[RuleTargets],
    sample_input: Any,
    data: list[Any] | None,
    capture: Callable[[Any], Captured],
) -> tuple[dict[tuple[int, str], BaseModel], dict[str, Any]]:
    """``(overrides, report)`` of ``spec.budget`` over the targets of its rules, from
    one pass over the blocks (see the module docstring); the blocks are left unread."""
    kind, fraction, rule_ids = terms(spec)
    damping = spec.calibration.damping if spec.calibration is not None else None
    aliases, tied = sharing(model)
    mask = padding_mask(sample_input) if sample_input is not None else None
    probe: dict[str, Any] = {"index": torch.tensor(0)}
    if mask is not None:
        probe["attention_mask"] = mask.to(device)
    curves, excluded, seen = [], [], set()
    sample = streams = hidden = None
    for i, bname in enumerate(stack.blocks):
        block = model.get_submodule(bname)
        weights.fill(list(block.named_modules(prefix=bname)), device)
        if i == 0:  # (capturing runs the first block for real)
            sample = capture(sample_input) if sample_input is not None else None
            streams = start(data, [capture(b) for b in data]) if data else None
            hidden = sample.hidden if sample is not None else None
        here = [
            (index, name)
            for index in rule_ids
            for name in targets[index].names
            if stack.index_of(name) == i and name not in seen
        ]
        seen.update(name for _, name in here)
        calls: dict[str, tuple] = {}  # each module's first call on the sample input
        reference = None
        if sample is not None:
            out = run_recorded(bname, block, sample.calls[i], hidden, calls)
            reference = output_vector(out, mask)
        shapes = {
            n: tuple(args[0].shape)
            for n, (args, _, _) in calls.items()
            if args and isinstance(args[0], torch.Tensor)
        }
        stats = None
        if streams is not None:
            stats = block_stats(streams, i, bname, block, [n for _, n in here], device)
        root = OnStream(bname, block, [sample.calls[i]], [hidden]) if sample is not None else None
        for index, name in here:
            rule, transform = spec.rules[index], targets[index].transform
            module = model.get_submodule(name)
            why, curve = shared_reason(name, aliases, tied), None
            extras: dict[str, Any] = {"input_stats": None, "damping": None}
            if why is None:
                st = stats.stats.get(name) if stats is not None else None
                extras = {"input_stats": st, "damping": damping if st is not None else None}
                curve, why = layer_curve(
                    module, name, index, rule, transform, kind, shapes.get(name), extras
                )
            if curve is None:
                excluded.append({"name": name, "rule_index": index, "reason": why})
                continue
            if root is not None:
                curve.sensitivity, curve.sensitivity_ratio = sensitivity(
                    root, curve, fraction, module, rule, transform, probe, reference, extras, mask
                )
            curves.append(curve)
        if sample is not None:
            hidden = run_on(block, sample.calls[i], hidden)
        if streams is not None:
            for b, cap in enumerate(streams.captured):
                streams.original[b] = run_on(block, cap.calls[i], streams.original[b])
        weights.unfill(block)
        give_back()
    what = SENSITIVITY if sample is not None else "none"
    return assign(spec, curves, excluded, what, spec.calibration is not None)
