"""What the plugins define in a spec, checked against the registry: each rule's
transform and params, the data sources of ``calibration`` and ``training``, and the
trainer. Every problem becomes one pydantic error item whose ``line`` is the message
the user reads (naming the rule and the field, with the closest valid name)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from tnsurgery.errors import did_you_mean
from tnsurgery.matching import shown
from tnsurgery.plugins import Registry
from tnsurgery.transform import RankOptions, Transform

PROBLEM = "tnsurgery_spec"  # the error type of the problems found here


def rule_label(index: int, match: Any) -> str:
    """How messages name a rule: its index and its first pattern(s), each cut to 60
    characters."""
    if isinstance(match, list) and not match:
        return f"rule {index} (match [])"
    if isinstance(match, list):
        first = ", ".join(_label_part(m) for m in match[:2]) + (", ..." if len(match) > 2 else "")
    elif match is None:
        return f"rule {index} (no match)"
    else:
        first = _label_part(match)
    return f"rule {index} (match {first})"


def _label_part(value: Any) -> str:
    if isinstance(value, str):
        return shown(value)
    small = isinstance(value, (bool, float, type(None))) or (
        isinstance(value, int) and abs(value) < 10**18
    )
    return repr(value) if small else type(value).__name__  # no repr of a huge value


def field_names(model: type[BaseModel]) -> list[str]:
    """The names a user writes for a model's fields (aliases where they have one)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def plain(data: Any) -> Any:
    """Spec input as plain data (models given in place of dicts are dumped)."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


def problem(loc: tuple, line: str, value: Any = None) -> InitErrorDetails:
    """One problem as a pydantic error item; ``line`` is the whole message."""
    error = PydanticCustomError(PROBLEM, "{line}", {"line": line})
    return InitErrorDetails(type=error, loc=loc, input=value)


def resolve(
    raw: dict[str, Any], registry: Registry, problems: list[InitErrorDetails]
) -> dict[int, tuple[BaseModel, Transform]]:
    """Check what the plugins define in ``raw``; returns each valid rule's parsed
    params and transform by rule index, and appends every problem to ``problems``."""
    _check_data(raw.get("calibration"), ("calibration", "data"), registry, problems)
    _check_data(raw.get("evaluation"), ("evaluation", "data"), registry, problems)
    training = raw.get("training")
    _check_data(training, ("training", "data"), registry, problems)
    trainer = training.get("trainer") if isinstance(training, dict) else None
    if isinstance(trainer, str) and trainer not in registry.trainers:
        try:
            registry.get_trainer(trainer)
        except KeyError as exc:
            line = f"spec: field 'training.trainer': {exc.args[0]}"
            problems.append(problem(("training", "trainer"), line, trainer))
    if isinstance(training, dict) and isinstance(training.get("eval_data"), dict):
        section = {"data": training["eval_data"]}
        _check_data(section, ("training", "eval_data"), registry, problems)
    rules_raw = raw.get("rules") if isinstance(raw.get("rules"), list) else []
    budgeted = _budget_rules(raw, len(rules_raw), problems)
    parsed: dict[int, tuple[BaseModel, Transform]] = {}
    for i, rule_raw in enumerate(rules_raw):
        if not isinstance(rule_raw, dict) or not isinstance(rule_raw.get("transform"), str):
            continue
        got = _resolve_rule(i, rule_raw, registry, raw, i in budgeted, problems)
        if got is not None:
            parsed[i] = got
    return parsed


def _resolve_rule(
    i: int,
    rule_raw: dict,
    registry: Registry,
    raw: dict,
    budgeted: bool,
    problems: list[InitErrorDetails],
) -> tuple[BaseModel, Transform] | None:
    label = rule_label(i, rule_raw.get("match"))
    tname = rule_raw["transform"]
    try:
        transform = registry.get(tname)
    except KeyError as exc:
        line = f"{label}: field 'transform': {exc.args[0]}"
        problems.append(problem(("rules", i, "transform"), line, tname))
        return None
    params_raw = rule_raw.get("params", {})
    if not isinstance(params_raw, dict):
        return None  # reported by the structural check
    if budgeted:
        if not issubclass(transform.params_model, RankOptions):
            line = (
                f"{label}: field 'transform': '{tname}' has no rank options, so it "
                "cannot be under the spec's budget"
            )
            problems.append(problem(("rules", i, "transform"), line, tname))
            return None
        given = [k for k in transform.params_model.rank_fields if k in params_raw]
        if given:
            line = (
                f"{label}: field 'params.{given[0]}': the spec's budget chooses this "
                "rule's ranks; remove the rank option"
            )
            problems.append(problem(("rules", i, "params", given[0]), line, params_raw[given[0]]))
            return None
        # validated with a placeholder; surgery sets each layer's ratio
        fraction = raw["budget"].get("params") or raw["budget"].get("flops") or 1.0
        params_raw = {**params_raw, "param_ratio": fraction}
    try:
        return transform.params_model.model_validate(params_raw), transform
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            line = _params_line(label, tname, err, transform.params_model)
            problems.append(problem(("rules", i, "params", *err["loc"]), line, err["input"]))
        return None


def _check_data(
    section: Any, where: tuple[str, str], registry: Registry, problems: list[InitErrorDetails]
) -> None:
    """Validate a ``data`` object against its source's params model."""
    if not isinstance(section, dict) or not isinstance(section.get("data"), dict):
        return  # missing or malformed: reported by the structural check
    data = section["data"]
    dotted = ".".join(where)
    try:
        source = registry.get_data_source(data.get("source"))
    except KeyError as exc:
        line = f"spec: field '{dotted}.source': {exc.args[0]}"
        problems.append(problem((*where, "source"), line, data.get("source")))
        return
    try:
        source.params_model.model_validate({k: v for k, v in data.items() if k != "source"})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in (dotted, *err["loc"]))
            if err["type"] == "extra_forbidden":
                valid = ["source", *field_names(source.params_model)]
                hint = did_you_mean(str(err["loc"][-1]), valid)
                line = (
                    f"spec: unknown field '{field}' for data source '{source.name}'{hint} "
                    f"(valid: {', '.join(valid)})"
                )
            else:
                line = f"spec: field '{field}': {err['msg'].removeprefix('Value error, ')}"
            problems.append(problem((*where, *err["loc"]), line, err["input"]))


def _budget_rules(raw: dict, n_rules: int, problems: list[InitErrorDetails]) -> set[int]:
    budget = raw.get("budget")
    if not isinstance(budget, dict):
        return set()
    ids = budget.get("rules")
    if ids is None:
        return set(range(n_rules))
    if not isinstance(ids, list):
        return set()
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    bad = [i for i in ids if not 0 <= i < n_rules]  # other values: the structural check
    if bad:
        line = f"spec: field 'budget.rules': no rule {bad[0]} (the spec has {n_rules} rules)"
        problems.append(problem(("budget", "rules"), line, ids))
    return {i for i in ids if 0 <= i < n_rules}


def _params_line(label: str, tname: str, err: dict, model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in ("params", *err["loc"]))
    if err["type"] == "extra_forbidden":
        valid = field_names(model)
        hint = did_you_mean(str(err["loc"][-1]), valid)
        return (
            f"{label}: unknown field '{field}' for transform '{tname}'{hint} "
            f"(valid: {', '.join(valid)})"
        )
    return f"{label}: field '{field}': {err['msg'].removeprefix('Value error, ')}"
