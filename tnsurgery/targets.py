"""Targets: which modules each rule of a spec selects, computed once per model state
and handed to calibration, the budget and the run (rules are passes: a later rule is
selected again only on a model that earlier rules changed)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tnsurgery.errors import MatchError
from tnsurgery.matching import MatchResult, select, type_matches
from tnsurgery.plan import PassInfo
from tnsurgery.plugins import Registry
from tnsurgery.spec import Rule, Spec
from tnsurgery.transform import Transform


@dataclass
class RuleTargets:
    """The modules one rule selects: its index, the rule, its resolved transform, the
    module names (in model order) and the full match result (what was excluded or of
    another type, for messages)."""

    index: int
    rule: Rule
    transform: Transform
    found: MatchResult

    @property
    def names(self) -> list[str]:
        """Names of the selected modules."""
        return self.found.names

    def pass_info(self) -> PassInfo:
        """The plan's record of this rule pass (before tracing)."""
        return PassInfo(
            rule_index=self.index,
            rule=self.rule.label(self.index),
            transform=self.rule.transform,
            trace="not traced (no target)",
            trace_error=None,
            matched=len(self.found.names),
            wrong_type=len(self.found.wrong_type),
            excluded=len(self.found.excluded),
        )


def select_rule(model: nn.Module, rule: Rule, index: int) -> RuleTargets:
    """The modules of ``model`` that ``rule`` selects (possibly none)."""
    transform = rule.resolved_transform
    found = select(model, rule.match, rule.exclude, rule.types, transform.module_types)
    return RuleTargets(index, rule, transform, found)


def select_targets(model: nn.Module, spec: Spec) -> list[RuleTargets]:
    """Every rule's selection on ``model`` as it is (for calibration and the budget,
    which look at the original model)."""
    return [select_rule(model, rule, i) for i, rule in enumerate(spec.rules)]


def require_some(
    model: nn.Module,
    targets: RuleTargets,
    allow_empty: bool,
    registry: Registry | None = None,
) -> None:
    """Raise :class:`MatchError` (naming the near misses) when the rule selected
    nothing and the spec does not allow that. When its patterns matched only modules
    of types the transform does not take, the error names those types and the
    installed transforms (of ``registry``) that take them."""
    found, rule, index, transform = targets.found, targets.rule, targets.index, targets.transform
    if found.names or allow_empty or rule.allow_empty:
        return
    modules = dict(model.named_modules())
    accepts = transform.module_types
    candidates = [n for n, m in modules.items() if n and isinstance(m, accepts)]
    if rule.types:  # the rule narrows the types: suggest only modules of its types
        candidates = [n for n in candidates if type_matches(modules[n], rule.types)]
    accepted = " or ".join(
        rule.types if rule.types else [t.__name__ for t in transform.module_types]
    )
    parts = [f"{rule.label(index)} matches no {accepted} module"]
    if found.wrong_type:
        parts.append(_other_types(found.wrong_type, modules, transform, rule, registry))
    if found.excluded:
        parts.append(f"{len(found.excluded)} matching module(s) removed by 'exclude'")
    near = found.near_misses(candidates, rule.match) or candidates[:5]
    if near:
        parts.append(f"closest {accepted} modules: " + ", ".join(near))
    parts.append('set "allow_empty": true on the rule to allow this')
    raise MatchError(["; ".join(parts)])


def _other_types(
    names: list[str],
    modules: dict[str, nn.Module],
    transform: Transform,
    rule: Rule,
    registry: Registry | None,
) -> str:
    """'matched only modules of other types: h.0.attn.c_attn, ...; Conv1D (24): no
    installed transform takes it'."""
    by_type: dict[str, list[nn.Module]] = {}
    for n in names:
        if n in modules:
            by_type.setdefault(type(modules[n]).__name__, []).append(modules[n])
    described = []
    for type_name, found in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
        takers = []
        if registry is not None:
            takers = [
                t.name
                for t in registry.transforms.values()
                if isinstance(found[0], t.module_types)
            ]
        if transform.name in takers:  # the transform takes it: the rule's types did not
            why = f"not of the rule's types {rule.types}"
        elif takers:
            why = f"'{transform.name}' does not take it; transforms that do: {', '.join(takers)}"
        else:
            why = "no installed transform takes it"
        described.append(f"{type_name} ({len(found)}): {why}")
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return f"matched only modules of other types: {shown}; " + "; ".join(described)
