"""Reading a spec: JSON or YAML files, dicts and :class:`Spec` objects, validated in
one pass with every problem reported at once in a :class:`~tnsurgery.errors.SpecError`
whose lines name the rule (index and pattern) and the field; and the JSON Schema of
the spec with every installed transform's params."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tnsurgery.errors import SpecError, did_you_mean
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec.model import Budget, Calibration, Rule, Spec
from tnsurgery.spec.resolve import PROBLEM, field_names, rule_label
from tnsurgery.spec.training import (
    CheckpointOptions,
    DistillOptions,
    ProgressiveRank,
    Training,
    TTOptions,
)


def load_spec(source: Spec | dict | str | Path, registry: Registry | None = None) -> Spec:
    """Read and fully validate a spec; raise :class:`SpecError` listing every problem.

    ``source`` is a :class:`Spec`, a dict, or the path of a ``.json`` /
    ``.yaml`` file. Rule params are checked by each transform's params model
    from ``registry`` (the installed plugins by default); the validated
    params are available as ``rule.parsed_params``, the transform as
    ``rule.resolved_transform``.
    """
    name = None
    if isinstance(source, Spec):
        raw: Any = source.to_dict()
    elif isinstance(source, dict):
        raw = source
    elif isinstance(source, (str, Path)):
        name = str(source)
        raw = read_spec_file(source)
    else:
        raise SpecError([f"a spec is a dict, a path or a Spec, not {type(source).__name__}"])
    if not isinstance(raw, dict):
        raise SpecError([f"spec: expected an object with 'rules', got {type(raw).__name__}"], name)
    registry = registry or get_registry()
    try:
        return Spec.model_validate(raw, context={"registry": registry})
    except ValidationError as exc:
        raise SpecError(spec_problems(exc, raw), source=name) from None


def spec_problems(exc: ValidationError, raw: Any) -> list[str]:
    """The lines a user reads for a spec's validation error: one per problem, naming
    the rule and the field; spec-level problems first, then by rule."""
    lines = []
    for err in exc.errors(include_url=False):
        if err["type"] == PROBLEM:
            lines.append(err["ctx"]["line"])
        else:
            lines.append(_format_one(tuple(err["loc"]), err, raw))
    return sorted(lines, key=_problem_order)


def _problem_order(line: str) -> int:
    """Spec-level problems first, then by rule index (stable within a rule)."""
    m = re.match(r"rule (\d+) ", line)
    return int(m.group(1)) + 1 if m else 0


def _format_one(loc: tuple, err: dict, raw: Any) -> str:
    where = "spec"
    field_loc = loc
    owner: type[BaseModel] = Spec
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        i = loc[1]
        rules = raw.get("rules") if isinstance(raw, dict) else None
        match = None
        if isinstance(rules, list) and i < len(rules) and isinstance(rules[i], dict):
            match = rules[i].get("match")
        where = rule_label(i, match)
        field_loc = loc[2:]
        owner = Rule
    elif len(loc) >= 2 and loc[0] in ("budget", "calibration", "training"):
        owner = {"budget": Budget, "calibration": Calibration, "training": Training}[loc[0]]
        if loc[0] == "training" and len(loc) >= 3:
            owner = {
                "distill": DistillOptions,
                "checkpoint": CheckpointOptions,
                "tt": TTOptions,
                "progressive_rank": ProgressiveRank,
            }.get(loc[1], owner)
    field = ".".join(str(p) for p in field_loc)
    if err["type"] == "extra_forbidden":
        name = str(field_loc[-1]) if field_loc else "?"
        valid = err.get("ctx", {}).get("valid") or field_names(owner)
        hint = did_you_mean(name, valid)
        return f"{where}: unknown field '{field}'{hint} (valid: {', '.join(valid)})"
    msg = err["msg"].removeprefix("Value error, ")
    if not field:
        return f"{where}: {msg}"
    return f"{where}: field '{field}': {msg}"


def read_spec_file(path: str | Path) -> Any:
    """Parse a JSON or YAML spec file into plain data; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"spec file not found: {p}"], source=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"cannot read spec file {p}: {exc}"], source=str(p)) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            ctx_mark = getattr(exc, "context_mark", None)
            if ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
                where += (
                    f" (in what starts at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
                )
            raise SpecError([f"not valid YAML: {problem}{where}"], source=str(p)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"],
            source=str(p),
        ) from None


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the whole spec, each installed transform's params included.

    Editors use it through the spec's ``"$schema"`` key: ``transform`` is an
    enum of the installed names and ``params`` is checked against the chosen
    transform's params model.
    """
    registry = registry or get_registry()
    schema = Spec.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    rule = defs["Rule"]
    names = sorted(registry.transforms)
    rule["properties"]["transform"]["enum"] = names
    branches = []
    for name in names:
        params_schema = registry.transforms[name].params_model.model_json_schema()
        for k, v in params_schema.pop("$defs", {}).items():
            defs[k] = v
        key = f"params_{name}"
        defs[key] = params_schema
        branches.append(
            {
                "if": {"properties": {"transform": {"const": name}}, "required": ["transform"]},
                "then": {"properties": {"params": {"$ref": f"#/$defs/{key}"}}},
            }
        )
    if branches:
        rule["allOf"] = branches
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tnsurgery spec"
    return schema
