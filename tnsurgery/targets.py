"""Targets: which modules each rule of a spec selects, computed once per model state
and handed to calibration, the budget and the run (rules are passes: a later rule is
selected again only on a model that earlier rules changed).

Fused modules (``nn.MultiheadAttention``) come first: :func:`split_fused` puts the
split equivalent (a registered :class:`~tnsurgery.hookspecs.Split`) in place of every
fused module a rule would select a part of, so that its parts are ordinary targets;
:func:`unsplit_unused` puts back those none of whose parts was replaced, and
:func:`split_records` gives the manifest's records of those that stay."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tnsurgery.errors import MatchError, SurgeryError
from tnsurgery.hookspecs import Split
from tnsurgery.layer import SurgeryLayer
from tnsurgery.manifest import Replacement
from tnsurgery.matching import MatchResult, name_matches, select, type_matches
from tnsurgery.plan import PassInfo, Plan
from tnsurgery.plugins import Registry
from tnsurgery.spec import Rule, Spec
from tnsurgery.swap import Swaps, copy_model
from tnsurgery.tracing import sharing
from tnsurgery.transform import Transform, qualified_name


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
    refused = [  # of the rule's own types, which its transform does not take
        n for n in found.wrong_type if rule.types and type_matches(modules[n], rule.types)
    ]
    if refused:
        takes = ", ".join(t.__name__ for t in transform.module_types)
        parts = [
            f"{rule.label(index)}: its transform '{transform.name}' does not take {accepted} "
            f"modules (it takes {takes}); the rule matched {len(refused)}: "
            + ", ".join(refused[:5])
            + (" ..." if len(refused) > 5 else "")
        ]
        split = registry.split_for(modules[refused[0]]) if registry is not None else None
        if split is not None:  # (a fused module: its parts are what to match)
            parts.append(
                f"{type(modules[refused[0]]).__name__}: its parts {', '.join(split.parts)} are "
                f"targets (split by '{split.name}'): match them, e.g. '{refused[0]}.*'"
            )
    else:
        parts = [f"{rule.label(index)} matches no {accepted} module"]
    others = [n for n in found.wrong_type if n not in refused]
    if others:
        text = _other_types(others, modules, transform, rule, registry)
        parts.append(text.replace("matched only", "also matched", 1) if refused else text)
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
        split = registry.split_for(found[0]) if registry is not None else None
        if split is not None:
            why += (
                f"; its parts {', '.join(split.parts)} are targets (split by "
                f"'{split.name}'): match them, e.g. '{_shown_name(names, found[0], modules)}.*'"
            )
        described.append(f"{type_name} ({len(found)}): {why}")
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return f"matched only modules of other types: {shown}; " + "; ".join(described)


def _shown_name(names: list[str], module: nn.Module, modules: dict[str, nn.Module]) -> str:
    return next((n for n in names if modules.get(n) is module), "NAME")


def require_a_replacement(
    result: Plan,
    spec: Spec,
    allow_empty: bool,
    rules: list[RuleTargets] = (),
    model: nn.Module | None = None,
    registry: Registry | None = None,
) -> None:
    """A surgery that replaces nothing is an error (a silent no-op would write an
    unchanged model), unless the call or every rule allows it (``allow_empty``). The
    message gives each target's reason and, for ``rules`` whose patterns also matched
    modules of types they did not select (a GPT-2's Conv1D under a Linear rule), those
    types and the transforms that take them."""
    if result.replaced() or allow_empty or all(rule.allow_empty for rule in spec.rules):
        return
    why = [f"{t.name}: {t.reason or t.status}" for t in result.targets][:5]
    more = f" (and {len(result.targets) - 5} more)" if len(result.targets) > 5 else ""
    others = []
    if model is not None:
        modules = dict(model.named_modules())
        for targets in rules:
            if targets.found.wrong_type:
                others.append(
                    f"{targets.rule.label(targets.index)} "
                    + _other_types(
                        targets.found.wrong_type, modules, targets.transform, targets.rule, registry
                    ).replace("matched only modules", "also matched modules", 1)
                )
    raise MatchError(
        [
            "nothing was replaced: every target was skipped or refused"
            + (f": {'; '.join(why)}{more}" if why else "")
            + "".join(f". {o}" for o in others)
            + '. Change the spec, or set "allow_empty": true on the rules (tnsurgery apply '
            "--allow-empty) to accept an unchanged model"
        ]
    )


# ---------------------------------------------------------------- fused modules


@dataclass
class FusedSplit:
    """One fused module split for a run: its name, the module that was there (put back
    when no part of it is replaced), the split equivalent now in its place, and the
    registered :class:`~tnsurgery.hookspecs.Split` that made it."""

    name: str
    fused: nn.Module
    split: nn.Module
    kind: Split


def split_fused(
    model: nn.Module, spec: Spec, registry: Registry, copy: bool
) -> tuple[nn.Module, list[FusedSplit]]:
    """Put the split equivalent of every fused module (one a registered split takes) in
    place of it when a rule of ``spec`` would select one of its parts: the rule's
    patterns (minus ``exclude``) name ``<module>.<part>``, and the part is of the rule's
    types and of a type its transform takes. Never a module inside a layer surgery
    built, one registered under several names, or one sharing a tensor with a module
    outside it (splitting copies its tensors: it would untie them).

    With ``copy``, ``model`` is left as it is and the splits are made in a copy (made
    only when some module is to be split). Returns the model to operate on and the
    splits, in model order."""
    candidates = _fused_candidates(model, spec, registry)
    if not candidates:
        return model, []
    if copy:
        model = copy_model(model)
    modules = dict(model.named_modules())
    swaps, done = Swaps(model), []
    for name, kind in candidates:
        fused = modules[name]
        split = kind.split(fused)
        if split is None:
            continue  # the split declines this one: it stays fused
        if not isinstance(split, kind.layers) or not hasattr(split, "config"):
            declared = ", ".join(c.__name__ for c in kind.layers) or "none"
            raise SurgeryError(
                f"split '{kind.name}' made a {type(split).__name__} for {name}, which is not "
                f"one of its declared layers ({declared})"
            )
        if not any(_selects_part(r, name, part, split) for r in spec.rules for part in kind.parts):
            continue
        swaps.swap(name, split)
        done.append(FusedSplit(name, fused, split, kind))
    return model, done


def _fused_candidates(model: nn.Module, spec: Spec, registry: Registry) -> list[tuple[str, Split]]:
    """Fused modules some rule's patterns name a part of (types are checked on the split)."""
    if not registry.splits:
        return []
    found, inside = [], set()
    for name, module in model.named_modules():
        if isinstance(module, SurgeryLayer):
            inside.update(f"{name}.{c}" for c, _ in module.named_modules() if c)
        kind = registry.split_for(module) if name and name not in inside else None
        if kind is None:
            continue
        named = any(
            name_matches(f"{name}.{part}", rule.match)
            and not (rule.exclude and name_matches(f"{name}.{part}", rule.exclude))
            for rule in spec.rules
            for part in kind.parts
        )
        if named:
            found.append((name, kind))
    if not found:
        return []
    aliases, tied = sharing(model)
    return [(n, k) for n, k in found if not aliases.get(n) and not _tied_outside(n, tied)]


def _tied_outside(name: str, tied: dict[str, list[str]]) -> bool:
    """Whether the module ``name`` or one inside it shares a tensor with a module
    outside it."""
    mine = [n for n in tied if n == name or n.startswith(f"{name}.")]
    return any(not (o == name or o.startswith(f"{name}.")) for n in mine for o in tied[n])


def _selects_part(rule: Rule, name: str, part_name: str, split: nn.Module) -> bool:
    """Whether ``rule`` would select the part ``part_name`` of ``split``, which is to
    be at ``name`` (what :func:`tnsurgery.matching.select` asks of every module)."""
    full, part = f"{name}.{part_name}", split._modules.get(part_name)
    if part is None or not name_matches(full, rule.match):
        return False
    if rule.exclude and name_matches(full, rule.exclude):
        return False
    accepted = rule.resolved_transform.module_types
    return type_matches(part, rule.types) and (not accepted or isinstance(part, accepted))


def unsplit_unused(
    work: nn.Module, splits: list[FusedSplit], result: Plan, swaps: Swaps
) -> list[FusedSplit]:
    """Put back (through ``swaps``) every fused module none of whose parts ``result``
    replaced, as it was; returns the splits that stay."""
    replaced = [t.name for t in result.replaced()]
    kept = []
    for s in splits:
        if any(n.startswith(f"{s.name}.") for n in replaced):
            kept.append(s)
        else:
            swaps.swap(s.name, s.fused)
    return kept


def split_records(splits: list[FusedSplit]) -> list[Replacement]:
    """The manifest's records of the splits that stay, to come before those of their
    parts: :func:`tnsurgery.load` replays them in order."""
    return [
        Replacement(
            name=s.name,
            operation="split",
            layer=qualified_name(type(s.split)),
            config=s.split.config(),
            split=s.kind.name,
        )
        for s in splits
    ]
