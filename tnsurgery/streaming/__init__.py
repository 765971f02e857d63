"""Surgery of a Hugging Face checkpoint directory, streamed: :func:`apply_checkpoint`.

The model is never loaded whole. Its skeleton is built from ``config.json`` with
every parameter on the meta device (:mod:`tnsurgery.io.skeleton`); the checkpoint's
index and shard headers are read and checked against it (:mod:`tnsurgery.io.checkpoint`);
then, with pipeline ``"blocks"``, the modules outside the block stack are read, and
each block in turn is read, surgered (every rule, in order, on its targets; with a
calibration, on statistics gathered block by block: :mod:`.calibrated`; with a
budget, ranks allocated after a first pass over the blocks: :mod:`.budgeted`), run
on the sample input beside the original block (the output error, block by block),
and written out (:mod:`tnsurgery.io.shards`: each tensor on disk at once) before the
next is read: peak memory is the modules outside the stack and one block (twice:
original and surgered). Tensors no rule touches are copied through in their stored dtype.

Specs that need the whole model at once (training, evaluation, a fused module to
split), rules selecting modules outside the stack, or a model with no single block
stack (an encoder-decoder) take pipeline ``"whole"``: the model is read from the
shards into memory and :func:`tnsurgery.surgery.apply` runs on it; the output is
written the same way.
The plan and the manifest say which pipeline ran (``pipeline``) and what it cost
(``streaming``: seconds, peak host and device memory, shards).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery.atomic import atomic_dir
from tnsurgery.blocks import BlockStack, find_stack
from tnsurgery.errors import UserInputError
from tnsurgery.io.checkpoint import Checkpoint, Weights
from tnsurgery.io.models import load_model
from tnsurgery.io.outputs import check_apart, check_replaceable_dir, copy_input_dir
from tnsurgery.io.shards import DEFAULT_SHARD_BYTES, ShardWriter
from tnsurgery.io.skeleton import empty_model, read_config
from tnsurgery.plan import Plan
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec import Spec, load_spec
from tnsurgery.streaming.dry import dry_plan
from tnsurgery.streaming.memory import MemoryWatch, large_allocations_mapped
from tnsurgery.streaming.run import Run
from tnsurgery.targets import select_targets
from tnsurgery.tracing import sharing
from tnsurgery.training.distributed import is_main_process

__all__ = ["StreamResult", "apply_checkpoint", "choose_pipeline"]

Progress = Callable[[int, int, str], None]


@dataclass
class StreamResult:
    """What :func:`apply_checkpoint` did: the plan (as the manifest records it), the
    manifest (``None`` for a dry run), the files written, and what it cost."""

    plan: Plan
    manifest: dict[str, Any] | None
    written: list[Path] = field(default_factory=list)


def choose_pipeline(spec: Spec, model: nn.Module) -> tuple[str, BlockStack | None, str]:
    """``("blocks" | "whole", the stack, why)`` for ``spec`` on the skeleton ``model``:
    blocks unless the spec needs the whole model (training, evaluation, a fused
    attention to split), the model has no single block stack, or a rule selects
    modules outside it; ``calibration.pipeline`` "whole" asks for the whole model,
    "blocks" for the blocks (an error, saying why, where they cannot run)."""
    cal = spec.calibration
    asked = cal.pipeline if cal is not None else "auto"
    if asked == "whole":
        return "whole", None, "calibration.pipeline is 'whole': the model is read whole"
    needs = [
        (spec.training is not None, "the spec trains"),
        (getattr(spec, "evaluation", None) is not None, "the spec evaluates"),
        (any(isinstance(m, nn.MultiheadAttention) for m in model.modules()), "fused attention"),
    ]
    why = next((why for needed, why in needs if needed), None)
    stack = None
    if why is None:
        stack = find_stack(model, cal.blocks if cal is not None else None)
        if stack is None:
            why = (
                f"no module list {cal.blocks} in the model"
                if cal is not None and cal.blocks
                else "no single block stack (e.g. an encoder-decoder)"
            )
    if why is None:
        selected = select_targets(model, spec)
        aliases, tied = sharing(model)  # (tied heads are refused in any pipeline)
        outside = [
            n
            for t in selected
            for n in t.names
            if stack.index_of(n) is None and not aliases.get(n) and not tied.get(n)
        ]
        if outside:
            why = f"the spec selects {outside[0]}, outside {stack.name}"
    if why is not None:
        if asked == "blocks":
            raise UserInputError(
                f"calibration.pipeline is 'blocks' but {why}: the blocks pipeline cannot run "
                "(set it to 'auto' or 'whole')"
            )
        return "whole", None, f"{why}: the model is read whole"
    return "blocks", stack, f"one block of {stack.name} at a time"


def apply_checkpoint(
    spec: Spec | dict | str | Path,
    source: str | Path,
    out: str | Path | None,
    *,
    sample_input: Any = None,
    sample_described: str | None = None,
    device: str | torch.device | None = None,
    dry_run: bool = False,
    allow_empty: bool = False,
    registry: Registry | None = None,
    progress: Progress | None = None,
    max_shard_bytes: int | None = None,
    protect: list[Path] | None = None,
    teacher: nn.Module | None = None,
    records: dict[str, Any] | None = None,
) -> StreamResult:
    """Surgery of the Hugging Face checkpoint directory ``source`` into ``out``, streamed
    (see the module docstring).

    Args:
        spec: a :class:`Spec`, a dict, or the path of a spec file.
        source: a directory with ``config.json`` and ``model.safetensors`` or a shard
            index (``model.safetensors.index.json``) and its shards.
        out: the output directory (written atomically: config and tokenizer files,
            the weights as shards with their index, ``manifest.json``); ``None`` only
            with ``dry_run``.
        sample_input: the model's input (a dict of tensors) on which the output error
            is measured, block by block; ``sample_described``: what it is, in words
            (kept in the plan and the manifest).
        device: where each block is surgered and run (``"cuda"``); default the CPU.
        dry_run: plan from the config and the shard headers alone (no tensor data
            read; targets whose settings need the weights say so); nothing written.
        max_shard_bytes: the size of an output shard (default: a single-file input
            gives a single file up to 5 GB; a sharded one, shards of its largest
            shard's size, at most 5 GB).
        protect: more files no output may touch (the spec's own file).
        teacher: the teacher of the spec's ``training`` (default: the original).
        records: more top-level entries of the manifest (e.g. ``source``).

    Returns:
        A :class:`StreamResult`. The output loads with :func:`tnsurgery.load` and
        transformers' ``from_pretrained`` (with tnsurgery installed).

    Raises:
        ModelLoadError: a missing, truncated or corrupt shard, an index naming a
            tensor its shard lacks, a tensor whose shape disagrees with the config
            (nothing is written).
        SpecError, MatchError, SurgeryError, OutputError: as :func:`tnsurgery.apply`.
    """
    spec = load_spec(spec, registry)
    registry = registry or get_registry()
    source = Path(source)
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: CUDA is not available on this machine")
    started = time.perf_counter()
    config = read_config(source)
    model = empty_model(source, config)
    with Checkpoint.open(source) as ckpt, MemoryWatch(dev) as watch, large_allocations_mapped():
        weights = Weights(model, ckpt)
        if weights.converted and not dry_run:  # (merged or split tensors: not a rename)
            model = load_model(source).model.to(dev)
            weights = Weights(model, ckpt, materialized=True)
            pipeline, stack = "whole", None
            why = "transformers converts this checkpoint's layout as it loads it: read whole"
        else:
            weights.check()
            pipeline, stack, why = choose_pipeline(spec, model)
        if dry_run:
            plan = dry_plan(model, spec, ckpt, weights, registry, allow_empty)
            plan.pipeline = pipeline
            plan.streaming = {"why": why, "shards_read": len(ckpt.shards)}
            return StreamResult(plan, None)
        if out is None:
            raise UserInputError("apply_checkpoint: give the output directory")
        out = Path(out)
        check_apart([out], [source, *(protect or [])])
        check_replaceable_dir(out)
        # under torchrun (a spec that trains sharded) every process runs, one writes
        writing = atomic_dir(out) if is_main_process() else _scratch()
        with writing as tmp:
            copy_input_dir(source, tmp)
            # as the input was: one file, or shards of its largest shard's size
            sharded = ckpt.index is not None
            shard = max_shard_bytes or (
                min(ckpt.shard_bytes(), DEFAULT_SHARD_BYTES) if sharded else DEFAULT_SHARD_BYTES
            )
            writer = ShardWriter(tmp, shard)
            run = Run(model, spec, ckpt, weights, registry, dev, writer, progress)
            try:
                if pipeline == "blocks":
                    run.blocks(stack, sample_input, allow_empty)
                else:
                    run.whole(sample_input, allow_empty, teacher)
            except BaseException:
                writer.close()  # (the temporary directory goes with the failure)
                raise
            plan = run.plan
            plan.pipeline = pipeline
            if plan.output_error is not None:
                plan.sample_input = sample_described
            plan.streaming = {
                "why": why,
                "device": str(dev),
                "shards_read": len(ckpt.shards),
                "bytes_read": ckpt.total_bytes(),
                **watch.report(),
            }
            manifest = run.finish(tmp, started, records or {})
        written = [out]
    return StreamResult(plan, manifest, written)


@contextmanager
def _scratch() -> Iterator[Path]:
    """A directory thrown away afterwards: where a process other than the first of a
    torchrun launch writes."""
    with tempfile.TemporaryDirectory(prefix="tnsurgery-rank-") as d:
        yield Path(d)
