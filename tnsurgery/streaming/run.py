"""One streamed surgery (:class:`Run`): the skeleton, the checkpoint, the output
shards, and the plan and manifest being made. Pipeline ``"blocks"``: the modules
outside the stack are read once; each block is read, surgered rule by rule (with its
targets' input statistics on the calibration data, and the sequential refit, when
the spec calibrates; with each target's params from a budget's first pass), run
beside the original on the sample input, written, freed.
Pipeline ``"whole"``: the model is read whole and :func:`tnsurgery.surgery.apply`
runs on it. Both write through the same :class:`~tnsurgery.io.shards.ShardWriter`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery import blocks as block_run
from tnsurgery import surgery
from tnsurgery.blocks import BlockStack
from tnsurgery.compare import (
    SampleInputError,
    headline,
    output_errors,
    relative_error,
    weight_error,
)
from tnsurgery.errors import SurgeryError
from tnsurgery.io import hf_entry
from tnsurgery.io.checkpoint import Checkpoint, Weights
from tnsurgery.io.files import MANIFEST_NAME
from tnsurgery.io.outputs import file_records
from tnsurgery.io.shards import ShardWriter
from tnsurgery.manifest import Manifest
from tnsurgery.plan import Plan
from tnsurgery.plugins import Registry, get_plugin_manager
from tnsurgery.replacing import build, decide, new_target, record_decision, refusal
from tnsurgery.spec import Spec
from tnsurgery.streaming.budgeted import allocate_blocks
from tnsurgery.streaming.calibrated import (
    advance,
    block_stats,
    calibration_batches,
    refit_block,
    start,
)
from tnsurgery.streaming.memory import give_back
from tnsurgery.swap import Swaps
from tnsurgery.targets import (
    RuleTargets,
    require_a_replacement,
    require_some,
    select_rule,
    select_targets,
)
from tnsurgery.tracing import module_flops, sharing
from tnsurgery.transform import Context

__all__ = ["Run"]

Progress = Callable[[int, int, str], None]


class Run:
    """One streamed surgery: the skeleton, the checkpoint, the output shards, and the
    plan and manifest being made."""

    def __init__(self, model, spec, ckpt, weights, registry, device, writer, progress) -> None:
        self.model: nn.Module = model
        self.spec: Spec = spec
        self.ckpt: Checkpoint = ckpt
        self.weights: Weights = weights
        self.registry: Registry = registry
        self.device: torch.device = device
        self.writer: ShardWriter = writer
        self.progress = progress
        self.plan = Plan(
            model_params_before=param_count(model),
            model_bytes_before=sum(ckpt.nbytes(k) for k in weights.key_of.values()),
        )
        self.built: dict[tuple[int, str], nn.Module] = {}
        self.overrides: dict[tuple[int, str], Any] = {}  # a budget's params per target
        self.aliases: dict[str, str] = {}
        self.written: set[str] = set()

    # --------------------------------------------------------------- blocks

    def blocks(self, stack: BlockStack, sample_input: Any, allow_empty: bool) -> None:
        """Pipeline ``"blocks"`` (see the module docstring): the plan, the output shards,
        the output error block by block on ``sample_input`` (when given)."""
        model, spec = self.model, self.spec
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        targets = select_targets(model, spec)
        for t in targets:
            require_some(model, t, allow_empty, self.registry)
        for t in targets:
            info = t.pass_info()
            info.trace = (
                "forward hooks on the sample input, one block at a time (streamed)"
                if sample_input is not None
                else "not traced: streamed with no sample input"
            )
            self.plan.passes.append(info)
        aliases, tied = sharing(model)
        outside = [
            (n, m)
            for n, m in model.named_modules()
            if n != stack.name and not n.startswith(stack.name + ".")
        ]
        self.weights.fill(outside, self.device)
        for t in targets:  # outside the stack: only targets every pipeline refuses (tied)
            for name in t.names:
                if stack.index_of(name) is None and self._one(
                    t.index, t, name, aliases, tied, None
                ):
                    raise AssertionError(f"{name} outside {stack.name} was not refused")
        cal = spec.calibration
        data = calibration_batches(spec, model, self.registry) if cal is not None else None
        if data is not None and sample_input is None:  # as surgery.apply: the first batch
            sample_input = data[0]
        if spec.budget is not None:  # a first pass over the blocks: statistics, then ranks
            self.overrides, self.plan.budget = allocate_blocks(
                model, spec, self.weights, self.device, stack, targets, sample_input, data,
                lambda batch: self._capture(stack, batch),
            )  # fmt: skip
        get_plugin_manager().hook.before_surgery(model=model, plan=self.plan)
        captured = streams = None
        total = len(stack.blocks)
        for i, bname in enumerate(stack.blocks):
            if self.progress:
                self.progress(i, total, f"block {bname}")
            original = model.get_submodule(bname)
            self.weights.fill(list(original.named_modules(prefix=bname)), self.device)
            if sample_input is not None and captured is None:
                captured = self._capture(stack, sample_input)
                h_orig = h_work = captured.hidden
                if data is not None:
                    streams = start(data, [self._capture(stack, b) for b in data])
            calls: dict[str, tuple] = {}
            if captured is not None:  # the original block first: what each target receives
                h_next = block_run.run_recorded(bname, original, captured.calls[i], h_orig, calls)
            stats = None
            if streams is not None:
                inside = [n for t in targets for n in t.names if stack.index_of(n) == i]
                stats = block_stats(streams, i, bname, original, inside, self.device)
            work = copy.deepcopy(original)
            _put(model, bname, work)
            self._surger(i, stack, targets, aliases, tied, calls, (original, streams, stats))
            if captured is not None:
                h_work = self._run_surgered(bname, work, captured.calls[i], h_work, calls)
                h_orig = h_next
            if streams is not None:
                advance(streams, i, original, work)
            self._write(work.state_dict(prefix=bname + ".", keep_vars=True))
            self.weights.forget(original)
            work.to("meta")
            del original, work, stats, calls
            give_back()  # (freed, the block's memory goes back to the system)
        if self.progress:
            self.progress(total, total, "modules outside the blocks")
        inside = stack.name + "."
        state = model.state_dict(keep_vars=True)
        self._write({k: v for k, v in state.items() if not k.startswith(inside)})
        self.plan.targets.sort(key=lambda t: (t.rule_index, order.get(t.name, len(order))))
        require_a_replacement(self.plan, spec, allow_empty, targets, model, self.registry)
        if captured is not None:
            ref = block_run.finish(model, stack, sample_input, captured, h_orig)
            new = block_run.finish(model, stack, sample_input, captured, h_work)
            errors = output_errors(ref, new)
            name = headline(ref, errors)
            self.plan.output_errors = errors
            self.plan.output_error, self.plan.output_error_name = (
                (0.0, "output") if name is None else (errors[name], name)
            )
        self.plan.model_params_after = param_count(model)
        if streams is not None:
            self.plan.calibration = streams.describe()
            if cal.sequential:
                report = dict(streams.report, seconds=round(streams.report["seconds"], 3))
                if not report["refitted"] and not report["groups"]:
                    report["note"] = "no replacement can be refitted"
                self.plan.calibration["sequential"] = report

    def _capture(self, stack: BlockStack, sample_input: Any) -> block_run.Captured:
        try:
            return block_run.capture(self.model, stack, _to(sample_input, self.device))
        except Exception as exc:  # noqa: BLE001 - the model's own error on this input
            raise SampleInputError(exc) from None

    def _surger(self, i, stack, targets: list[RuleTargets], aliases, tied, calls, cal) -> None:
        """Every rule, in order, on the targets of block ``i`` (the surgered copy now
        in the skeleton); with a calibration (``cal``: the original block, the
        streams and the block's statistics), each rule's replacements are refitted
        before the next rule runs, as :func:`tnsurgery.surgery.apply` does."""
        model, spec = self.model, self.spec
        original, streams, stats = cal
        bname = stack.blocks[i]
        built_here = False
        for index, rule in enumerate(spec.rules):
            rule_targets = targets[index]
            if built_here:  # an earlier rule changed this block: select again, as apply does
                rule_targets = select_rule(model, rule, index)
            names = [n for n in rule_targets.names if stack.index_of(n) == i]
            with Swaps(model) as swaps:
                for name in names:
                    st = stats.stats.get(name) if stats is not None else None
                    made = self._one(index, rule_targets, name, aliases, tied, calls.get(name), st)
                    if made is not None:
                        swaps.swap(name, made)
                        built_here = True
            if streams is not None and spec.calibration.sequential:
                todo = [
                    t
                    for t in self.plan.targets
                    if t.rule_index == index and t.status == "replace" and t.name in names
                ]
                work = model.get_submodule(bname)
                damping = spec.calibration.damping
                refit_block(
                    streams, i, bname, original, work, rule_targets.transform, index, todo,
                    stats, damping,
                )  # fmt: skip

    def _one(
        self, index, targets: RuleTargets, name, aliases, tied, call, stats=None
    ) -> nn.Module | None:
        """Plan and build one target (as :func:`tnsurgery.surgery.apply` does, with no
        trace: the weights are read one block at a time)."""
        rule, transform = targets.rule, targets.transform
        module = self.model.get_submodule(name)
        tp = new_target(index, rule, name, module)
        if call is not None:  # (args, kwargs, output) of its call on the sample input
            tp.calls = 1
            tp.input_shape = tuple(call[0][0].shape) if call[0] else None
            out = call[2]
            tp.output_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        tp.flops_before = module_flops(module, tp.input_shape)
        tp.bytes_before = sum(p.numel() * p.element_size() for p in module.parameters())
        self.plan.targets.append(tp)
        tp.reason = refusal(name, module, None, aliases, tied, "none")
        if tp.reason:
            tp.status = "refuse"
            return None
        params = self.overrides.get((index, name), rule.parsed_params)
        damping = self.spec.calibration.damping if stats is not None else None
        ctx = Context(name=name, input_shape=tp.input_shape, input_stats=stats, damping=damping)
        decision = decide(transform, module, params, ctx)
        decision.params = params
        if not record_decision(tp, module, decision, (index, name) in self.overrides):
            return None
        new = build(transform, module, tp, decision)
        tp.weight_error = weight_error(module, new)
        if tp.params_after is None:
            tp.params_after = sum(p.numel() for p in new.parameters())
        self.built[(index, name)] = new
        return new

    def _run_surgered(self, bname, work, call, hidden, calls) -> torch.Tensor:
        """The surgered block's output on ``hidden``, and each replaced target's output
        error (its new layer on the inputs the original layer received)."""
        replaced = [
            t for t in self.plan.targets if t.status == "replace" and t.name.startswith(bname + ".")
        ]
        with torch.no_grad():
            for t in replaced:
                args, kwargs, out = calls.get(t.name, ((), {}, None))
                if isinstance(out, torch.Tensor):
                    new = work.get_submodule(t.name[len(bname) + 1 :])
                    t.output_error = relative_error(new(*args, **kwargs), out)
        try:
            return block_run.run_block(work, call, hidden)
        except Exception as exc:
            raise SurgeryError(
                f"the surgered block {bname} fails on the sample input, where the original "
                f"runs: a replacement layer is not a drop-in for the module it replaced: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # --------------------------------------------------------------- whole

    def whole(self, sample_input: Any, allow_empty: bool, teacher: nn.Module | None) -> None:
        """The model read whole, then :func:`tnsurgery.surgery.apply` in place."""
        model = self.model
        if not self.weights.materialized:
            self.weights.fill(list(model.named_modules()), self.device)
        if sample_input is not None:
            sample_input = _to(sample_input, self.device)
        surgery.apply(
            model,
            self.spec,
            sample_input,
            inplace=True,
            allow_empty=allow_empty,
            registry=self.registry,
            progress=self.progress,
            teacher=teacher,
        )
        applied = Plan.from_dict(Manifest.of(model).plan)
        applied.model_bytes_before = self.plan.model_bytes_before
        self.plan = applied
        self._write(model.state_dict(keep_vars=True))

    # --------------------------------------------------------------- output

    def _write(self, state: dict[str, torch.Tensor]) -> None:
        """Queue the tensors of one unit (a block, or the modules around the stack); a
        tensor met twice in it (tied weights) is written once, the other name recorded
        as its alias."""
        seen: dict[int, str] = {}
        for full, t in state.items():
            if full in self.written or full in self.aliases:
                continue
            if id(t) in seen:
                self.aliases[full] = seen[id(t)]
                continue
            seen[id(t)] = full
            self.writer.add(full, t)
            self.written.add(full)

    def finish(self, tmp: Path, started: float, records: dict[str, Any]) -> dict[str, Any]:
        """The manifest, the guards, the config entry and the index; returns the manifest."""
        model = self.model
        self.plan.applied = True
        if self.plan.pipeline == "blocks" or Manifest.of(model) is None:
            manifest = surgery.build_manifest(model, self.spec, self.plan, self.built, [])
        else:
            manifest = Manifest.model_validate(
                {**Manifest.of(model).to_dict(), "plan": self.plan.to_dict()}
            )
        guards = hf_entry.guard_names(model, manifest, self.written | set(self.aliases))
        for g in guards:
            self.writer.add(g, hf_entry.guard_tensor())
        names = self.writer.finish()
        self.plan.streaming["seconds"] = round(time.perf_counter() - started, 3)
        self.plan.streaming["shards_written"] = len(
            [n for n in names if n.endswith(".safetensors")]
        )
        update = {"plan": self.plan.to_dict(), **records}
        if self.plan.sample_input is not None:
            update["sample_input"] = self.plan.sample_input
        manifest = Manifest.model_validate({**manifest.to_dict(), **update})
        if self.plan.pipeline == "blocks":
            get_plugin_manager().hook.after_surgery(
                model=model, plan=self.plan, manifest=manifest.to_dict()
            )
        hf_entry.write_config(
            tmp / hf_entry.CONFIG_NAME, hf_entry.entry(manifest, guards, self.aliases)
        )
        data = {
            **manifest.to_dict(),
            "weights": names[-1],
            "aliases": self.aliases,
            "guards": guards,
        }
        data["files"] = file_records({n: tmp / n for n in names})
        (tmp / MANIFEST_NAME).write_text(
            json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"
        )
        manifest.attach(model)
        return data


def param_count(model: nn.Module) -> int:
    """Parameters of ``model`` (meta ones included, shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[attr] = module


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
