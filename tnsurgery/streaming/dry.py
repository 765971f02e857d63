"""``--dry-run``: the plan of a checkpoint directory from its config and its shard
headers alone. Each target is decided on a zero-valued copy of its shape (no
tensor data is read); settings whose rank depends on the values (``energy``,
``max_error``) are left to the real run, and predicted errors are not given.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tnsurgery.plan import Plan
from tnsurgery.replacing import decide, new_target, record_decision
from tnsurgery.streaming.run import param_count
from tnsurgery.targets import (
    require_some,
    select_targets,
)
from tnsurgery.tracing import sharing
from tnsurgery.transform import Context

__all__ = ["dry_plan"]


def dry_plan(model, spec, ckpt, weights, registry, allow_empty) -> Plan:
    """The plan from the config and the headers alone: each target decided on the meta
    device (a decision that needs the weights says so)."""
    plan = Plan(
        model_params_before=param_count(model),
        model_bytes_before=sum(ckpt.nbytes(k) for k in weights.key_of.values()),
    )
    # the stored dtypes, so that the bytes before and after are the checkpoint's
    for name, p in list(model.named_parameters()):
        dtype = ckpt.dtype(weights.key(p)) if weights.key(p) else None
        if dtype is not None and dtype != p.dtype and dtype.is_floating_point:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._parameters[attr] = nn.Parameter(p.to(dtype), requires_grad=False)
    targets = select_targets(model, spec)
    aliases, tied = sharing(model)
    for t in targets:
        require_some(model, t, allow_empty, registry)
        plan.passes.append(t.pass_info())
        for name in t.names:
            module = model.get_submodule(name)
            tp = new_target(t.index, t.rule, name, module)
            tp.bytes_before = sum(p.numel() * p.element_size() for p in module.parameters())
            plan.targets.append(tp)
            if aliases.get(name) or tied.get(name):
                tp.status = "refuse"
                tp.reason = (
                    "shares the module or its parameters with "
                    + ", ".join(aliases.get(name) or tied.get(name))
                    + " (tied weights); never split"
                )
                continue
            params = t.rule.parsed_params
            needs = [k for k in DATA_DEPENDENT if getattr(params, k, None) is not None]
            if needs:
                tp.reason = f"its {needs[0]} settles the rank when the weights are read"
                continue
            decision = decide(
                t.transform, _zeros_like(module), params, Context(name, plan_only=True)
            )
            decision.params = params
            if not record_decision(tp, module, decision):
                continue
            tp.predicted_error = tp.predicted_output_error = None  # (of zeros: meaningless)
    return plan


# settings whose rank depends on the weights' values: a dry run cannot resolve them
DATA_DEPENDENT = ("energy", "max_error")


def _zeros_like(module: nn.Module) -> nn.Module:
    """A copy of a meta ``module`` with zeros for values (on the CPU): what a dry run
    plans on, its sizes being all that the plan reads of it."""
    probe = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*probe.parameters(), *probe.buffers()]:
            t.zero_()
    return probe
