"""The spec: pydantic models of the file a user writes (the public contract).

:func:`load_spec` reads a spec from a dict, a JSON/YAML file or a
:class:`Spec`, validates the structure, every pattern, every transform name
and every rule's params against the transform's own params model, and
reports **all** problems at once in a :class:`~tnsurgery.errors.SpecError`
whose lines name the rule (index and pattern) and the field.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tnsurgery.errors import SpecError
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.training import Training
from tnsurgery.transform import RankOptions


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PatternList = Annotated[
    list[str], BeforeValidator(_as_list, json_schema_input_type=str | list[str])
]


class Rule(BaseModel):
    """One rule: which modules (``match``/``exclude``/``types``) get which transform."""

    model_config = ConfigDict(extra="forbid")

    match: PatternList = Field(
        ...,
        min_length=1,
        description="Pattern(s) over dotted module names. Glob: '*' is one name segment, "
        "'**' any number of segments; prefix 're:' for a Python regex (full match).",
    )
    exclude: PatternList = Field(
        default_factory=list, description="Patterns (same syntax as match) to leave out."
    )
    types: PatternList = Field(
        default_factory=list,
        description="Module class names ('Linear') or qualified names ('torch.nn.Linear').",
    )
    transform: str = Field(..., description="Name of the transform (see `tnsurgery plugins`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Params of the transform, checked by its own model."
    )
    allow_empty: bool = Field(False, description="Do not fail when the rule matches no module.")

    _params: BaseModel | None = PrivateAttr(default=None)

    @field_validator("match", "exclude")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if not p:
                raise ValueError("empty pattern")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise ValueError(f"bad regex {p[3:]!r}: {exc}") from None
        return patterns

    @property
    def parsed_params(self) -> BaseModel:
        """The params validated by the transform's params model (after :func:`load_spec`)."""
        if self._params is None:
            raise RuntimeError("rule params not validated yet: use tnsurgery.spec.load_spec")
        return self._params

    def label(self, index: int) -> str:
        """``rule 0 (match 'encoder.**')``: how messages name this rule."""
        return rule_label(index, self.match)


class Budget(BaseModel):
    """A global budget over some rules' targets: per-layer ranks are then chosen by
    tnsurgery (see :mod:`tnsurgery.budget`), so those rules give no rank option."""

    model_config = ConfigDict(extra="forbid")

    params: float | None = Field(
        None, gt=0, le=1, description="Fraction of the targets' parameters to keep, in total."
    )
    flops: float | None = Field(
        None, gt=0, le=1, description="Fraction of the targets' FLOPs to keep, in total."
    )
    rules: list[int] | None = Field(
        None, description="Indices of the rules under the budget (default: all)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Budget:
        if (self.params is None) == (self.flops is None):
            raise ValueError("give exactly one of params, flops")
        return self


class Calibration(BaseModel):
    """Data-aware surgery: run the original model over ``samples`` examples of
    ``data`` and collect, for each target, the second moment of its inputs;
    transforms that use it (``factorize`` whitens) then minimize each layer's
    output error on that data rather than its weight error."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(
        ...,
        description="Where the examples come from: {'source': 'tensors'|'callable'|'text'|"
        "'random'|<plugin>, ...its params}.",
    )
    samples: int = Field(512, ge=1, description="Examples to run (after batching).")
    batch_size: int = Field(32, ge=1, description="Examples per forward pass.")
    damping: float = Field(
        1e-2,
        ge=0,
        description="Added to the input second moment's diagonal, relative to its mean "
        "(keeps directions the data never visits from being ignored entirely).",
    )
    seed: int = Field(0, description="Seed of the data source (random data).")
    sequential: bool = Field(
        False,
        description="After surgery, re-solve each replacement in call order for the inputs "
        "it receives from the layers surgered before it, so later layers compensate "
        "earlier errors (GPTQ / SVD-LLM v2 style): one more pass over the data per group "
        "of layers sharing an input. Transforms with a refit: factorize (Linear).",
    )


class Spec(BaseModel):
    """A surgery spec: ordered rules, applied as passes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str | None = Field(None, alias="$schema", description="JSON Schema, for editors.")
    version: Literal[1] = Field(1, description="Spec format version.")
    description: str | None = Field(None, description="Free text, kept in the manifest.")
    rules: list[Rule] = Field(..., min_length=1, description="Rules, applied in order.")
    budget: Budget | None = Field(
        None,
        description="Pick per-layer ranks of these rules to meet a global params/FLOPs budget "
        "with the least damage to the model's output.",
    )
    calibration: Calibration | None = Field(
        None,
        description="Data to run the original model on first: transforms then keep each "
        "layer's outputs on that data (e.g. whitened factorization).",
    )
    training: Training | None = Field(
        None,
        description="Train after the transforms: distill from the original model "
        "(label-free) or fine-tune.",
    )

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-compatible data (what the manifest records)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def rule_label(index: int, match: Any) -> str:
    """How messages name a rule: its index and its first pattern(s)."""
    if isinstance(match, list) and not match:
        return f"rule {index} (match [])"
    if isinstance(match, list):
        shown = ", ".join(repr(m) for m in match[:2]) + (", ..." if len(match) > 2 else "")
    elif match is None:
        return f"rule {index} (no match)"
    else:
        shown = repr(match)
    return f"rule {index} (match {shown})"


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        names.append(info.alias or name)
    return names


def _format_pydantic(
    exc: ValidationError, raw: Any, model: type[BaseModel], prefix_loc: tuple = ()
) -> list[str]:
    """One line per pydantic error, naming the rule and the field."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = prefix_loc + tuple(err["loc"])
        lines.append(_format_one(loc, err, raw))
    return lines


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
            from tnsurgery.training import (
                CheckpointOptions,
                DistillOptions,
                ProgressiveRank,
                TTOptions,
            )

            owner = {
                "distill": DistillOptions,
                "checkpoint": CheckpointOptions,
                "tt": TTOptions,
                "progressive_rank": ProgressiveRank,
            }.get(loc[1], owner)
    field = ".".join(str(p) for p in field_loc)
    if err["type"] == "extra_forbidden":
        name = str(field_loc[-1]) if field_loc else "?"
        valid = err.get("ctx", {}).get("valid") or _field_names(owner)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: unknown field '{field}'{hint} (valid: {', '.join(valid)})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
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


def load_spec(source: Spec | dict | str | Path, registry: Registry | None = None) -> Spec:
    """Read and fully validate a spec; raise :class:`SpecError` listing every problem.

    ``source`` is a :class:`Spec`, a dict, or the path of a ``.json`` /
    ``.yaml`` file. Rule params are checked by each transform's params model
    from ``registry`` (the installed plugins by default); the validated
    params are available as ``rule.parsed_params``.
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
    problems: list[str] = []
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_format_pydantic(exc, raw, Spec))
        spec = None
    # Check transforms and params of every rule that is a dict, even when other
    # parts failed, so the user sees all problems at once.
    _check_data(raw.get("calibration"), "calibration.data", registry, problems)
    _check_data(raw.get("training"), "training.data", registry, problems)
    trainer = raw["training"].get("trainer") if isinstance(raw.get("training"), dict) else None
    if isinstance(trainer, str) and trainer not in registry.trainers:
        try:
            registry.get_trainer(trainer)
        except KeyError as exc:
            problems.append(f"spec: field 'training.trainer': {exc.args[0]}")
    if isinstance(raw.get("training"), dict) and isinstance(raw["training"].get("eval_data"), dict):
        _check_data(
            {"data": raw["training"]["eval_data"]}, "training.eval_data", registry, problems
        )
    rules_raw = raw.get("rules") if isinstance(raw.get("rules"), list) else []
    budgeted = _budget_rules(raw, len(rules_raw), problems)
    for i, rule_raw in enumerate(rules_raw):
        if not isinstance(rule_raw, dict) or not isinstance(rule_raw.get("transform"), str):
            continue
        label = rule_label(i, rule_raw.get("match"))
        tname = rule_raw["transform"]
        try:
            transform = registry.get(tname)
        except KeyError as exc:
            problems.append(f"{label}: field 'transform': {exc.args[0]}")
            continue
        params_raw = rule_raw.get("params", {})
        if not isinstance(params_raw, dict):
            continue  # already reported by the structural check
        if i in budgeted:
            if not issubclass(transform.params_model, RankOptions):
                problems.append(
                    f"{label}: field 'transform': '{tname}' has no rank options, so it "
                    "cannot be under the spec's budget"
                )
                continue
            given = [k for k in transform.params_model.rank_fields if k in params_raw]
            if given:
                problems.append(
                    f"{label}: field 'params.{given[0]}': the spec's budget chooses this "
                    "rule's ranks; remove the rank option"
                )
                continue
            # validated with a placeholder; surgery sets each layer's ratio
            fraction = raw["budget"].get("params") or raw["budget"].get("flops") or 1.0
            params_raw = {**params_raw, "param_ratio": fraction}
        try:
            parsed = transform.params_model.model_validate(params_raw)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                problems.append(_format_params_error(label, tname, err, transform.params_model))
            continue
        if spec is not None:
            spec.rules[i]._params = parsed
    if problems:
        raise SpecError(sorted(problems, key=_problem_order), source=name)
    assert spec is not None
    return spec


def _check_data(section: Any, where: str, registry: Registry, problems: list[str]) -> None:
    """Validate a ``data`` object against its source's params model."""
    if not isinstance(section, dict) or not isinstance(section.get("data"), dict):
        return  # missing or malformed: reported by the structural check
    data = section["data"]
    try:
        source = registry.get_data_source(data.get("source"))
    except KeyError as exc:
        problems.append(f"spec: field '{where}.source': {exc.args[0]}")
        return
    try:
        source.params_model.model_validate({k: v for k, v in data.items() if k != "source"})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in (where, *err["loc"]))
            if err["type"] == "extra_forbidden":
                name = str(err["loc"][-1])
                valid = ["source", *_field_names(source.params_model)]
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(
                    f"spec: unknown field '{field}' for data source '{source.name}'{hint} "
                    f"(valid: {', '.join(valid)})"
                )
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"spec: field '{field}': {msg}")


def _budget_rules(raw: dict, n_rules: int, problems: list[str]) -> set[int]:
    budget = raw.get("budget")
    if not isinstance(budget, dict):
        return set()
    ids = budget.get("rules")
    if ids is None:
        return set(range(n_rules))
    if not isinstance(ids, list):
        return set()
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < n_rules]
    if bad:
        problems.append(
            f"spec: field 'budget.rules': no rule {bad[0]} (the spec has {n_rules} rules)"
        )
    return {i for i in ids if isinstance(i, int) and 0 <= i < n_rules}


def _problem_order(line: str) -> int:
    """Spec-level problems first, then by rule index (stable within a rule)."""
    m = re.match(r"rule (\d+) ", line)
    return int(m.group(1)) + 1 if m else 0


def _format_params_error(label: str, tname: str, err: dict, model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in ("params", *err["loc"]))
    if err["type"] == "extra_forbidden":
        name = str(err["loc"][-1])
        valid = _field_names(model)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return (
            f"{label}: unknown field '{field}' for transform '{tname}'{hint} "
            f"(valid: {', '.join(valid)})"
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{label}: field '{field}': {msg}"


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
