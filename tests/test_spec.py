"""The spec: inputs (dict, JSON, YAML, Spec), one bad spec per field, and the JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import factorize_only_registry
from pydantic import ValidationError

from tnsurgery.errors import SpecError, UserInputError
from tnsurgery.spec import Rule, Spec, json_schema, load_spec, spec_problems
from tnsurgery.transforms.factorize import FactorizeParams

GOOD = {
    "version": 1,
    "rules": [
        {
            "match": ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"],
            "exclude": ["encoder.layer.0.**"],
            "types": ["Linear"],
            "transform": "factorize",
            "params": {"rank": 64},
        },
        {
            "match": "re:.*attention\\.self\\.(query|key|value)$",
            "transform": "factorize",
            "params": {"energy": 0.95},
        },
    ],
}

RANK_OPTIONS_LIST = "rank, rank_ratio, param_ratio, energy, max_error"
PARAM_NAMES = f"{RANK_OPTIONS_LIST}, method, niter, oversample, seed, rank_multiple, whiten"
RULE_FIELDS = "match, exclude, types, transform, params, allow_empty"


def rule(params=None, **fields):
    """One factorize rule on 'a', with fields overridden."""
    out = {"match": "a", "transform": "factorize", "params": {"rank": 4}}
    if params is not None:
        out["params"] = params
    out.update(fields)
    return out


def problems_of(source, registry) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(source, registry)
    err = info.value
    assert isinstance(err, UserInputError)
    head, *lines = str(err).splitlines()
    n = len(err.problems)
    assert head.endswith(f"{n} problem{'s' if n != 1 else ''}")
    assert lines == [f"  - {p}" for p in err.problems]
    return err.problems


# --- good inputs -------------------------------------------------------------------------


def check_good(spec: Spec) -> None:
    assert isinstance(spec, Spec)
    assert [r.transform for r in spec.rules] == ["factorize", "factorize"]
    first, second = spec.rules
    assert first.match == ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]
    assert first.exclude == ["encoder.layer.0.**"]
    assert first.types == ["Linear"]
    assert second.match == ["re:.*attention\\.self\\.(query|key|value)$"]  # one pattern -> list
    assert second.exclude == [] and second.types == []
    assert isinstance(first.parsed_params, FactorizeParams)
    assert first.parsed_params.rank == 64
    assert first.parsed_params.describe() == {"rank": 64}
    assert second.parsed_params.energy == 0.95
    assert second.parsed_params.method == "auto"


def test_load_dict(factorize_registry):
    check_good(load_spec(GOOD, factorize_registry))


def test_load_json_file(tmp_path, factorize_registry):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(GOOD, indent=2))
    check_good(load_spec(path, factorize_registry))
    check_good(load_spec(str(path), factorize_registry))


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_yaml_file(tmp_path, factorize_registry, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - match: [encoder.layer.*.intermediate.dense, encoder.layer.*.output.dense]\n"
        "    exclude: ['encoder.layer.0.**']\n"
        "    types: [Linear]\n"
        "    transform: factorize\n"
        "    params: {rank: 64}\n"
        "  - match: 're:.*attention\\.self\\.(query|key|value)$'\n"
        "    transform: factorize\n"
        "    params:\n"
        "      energy: 0.95\n"
    )
    check_good(load_spec(path, factorize_registry))


def test_load_spec_instance_validates_params(factorize_registry):
    spec = Spec.model_validate(GOOD)
    loaded = load_spec(spec, factorize_registry)
    check_good(loaded)
    assert loaded.to_dict() == spec.to_dict()


def test_a_spec_is_complete_however_it_is_made():
    """One pass: Spec.model_validate and Spec(...) resolve transforms and params too."""
    spec = Spec.model_validate(GOOD)
    assert spec.rules[0].parsed_params.rank == 64
    assert spec.rules[0].resolved_transform.name == "factorize"
    built = Spec(rules=[Rule(match="a", transform="factorize", params={"rank": 3})])
    assert built.rules[0].parsed_params.rank == 3
    with pytest.raises(RuntimeError, match="Spec.model_validate"):
        _ = Rule(match="a", transform="factorize").parsed_params


def test_params_are_checked_by_their_transform_through_the_validation_context(
    factorize_registry,
):
    with pytest.raises(ValidationError) as info:
        Spec.model_validate(
            {"rules": [rule(transform="fatorize"), rule(params={"rnk": 3})]},
            context={"registry": factorize_registry},
        )
    locs = [e["loc"] for e in info.value.errors()]
    assert ("rules", 0, "transform") in locs and ("rules", 1, "params", "rnk") in locs
    assert spec_problems(info.value, {"rules": [rule(transform="fatorize")]})[0] == (
        "rule 0 (match 'a'): field 'transform': unknown transform 'fatorize'; "
        "did you mean 'factorize'? (valid: factorize)"
    )


def test_schema_key_and_description_are_kept(factorize_registry):
    raw = {"$schema": "./schema.json", "description": "shrink it", "rules": [rule()]}
    spec = load_spec(raw, factorize_registry)
    assert spec.to_dict()["$schema"] == "./schema.json"
    assert spec.to_dict()["description"] == "shrink it"


def test_default_registry_knows_factorize():
    spec = load_spec({"rules": [rule()]})
    assert spec.rules[0].parsed_params.rank == 4


# --- one bad spec per field, exact messages ----------------------------------------------


def test_unknown_top_level_key(factorize_registry):
    problems = problems_of({"version": 1, "rule": [rule()]}, factorize_registry)
    assert problems == [
        "spec: field 'rules': Field required",
        "spec: unknown field 'rule'; did you mean 'rules'? "
        "(valid: $schema, version, description, rules, budget, calibration, training, "
        "evaluation)",
    ]


def test_unknown_rule_key(factorize_registry):
    bad = {"match": "a", "mach": "b", "transform": "factorize", "params": {"rank": 4}}
    assert problems_of({"rules": [rule(), bad]}, factorize_registry) == [
        f"rule 1 (match 'a'): unknown field 'mach'; did you mean 'match'? (valid: {RULE_FIELDS})"
    ]


def test_unknown_transform(factorize_registry):
    assert problems_of({"rules": [rule(transform="fatorize")]}, factorize_registry) == [
        "rule 0 (match 'a'): field 'transform': unknown transform 'fatorize'; "
        "did you mean 'factorize'? (valid: factorize)"
    ]


def test_unknown_transform_without_close_name_lists_the_valid_ones(factorize_registry):
    (problem,) = problems_of({"rules": [rule(transform="zzz")]}, factorize_registry)
    assert problem == (
        "rule 0 (match 'a'): field 'transform': unknown transform 'zzz' (valid: factorize)"
    )


def test_unknown_param(factorize_registry):
    assert problems_of({"rules": [rule({"rnak": 4})]}, factorize_registry) == [
        "rule 0 (match 'a'): unknown field 'params.rnak' for transform 'factorize'; "
        f"did you mean 'rank'? (valid: {PARAM_NAMES})"
    ]


def test_two_rank_options(factorize_registry):
    assert problems_of({"rules": [rule({"rank": 4, "energy": 0.9})]}, factorize_registry) == [
        f"rule 0 (match 'a'): field 'params': give exactly one of {RANK_OPTIONS_LIST} "
        "(got rank, energy)"
    ]


def test_no_rank_option(factorize_registry):
    assert problems_of({"rules": [rule({"method": "exact"})]}, factorize_registry) == [
        f"rule 0 (match 'a'): field 'params': give exactly one of {RANK_OPTIONS_LIST} (got none)"
    ]


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"rank": 0}, "field 'params.rank': Input should be greater than 0"),
        ({"rank": -3}, "field 'params.rank': Input should be greater than 0"),
        ({"rank": 2.5}, "field 'params.rank': Input should be a valid integer"),
        ({"rank_ratio": 1.5}, "field 'params.rank_ratio': Input should be less than or equal to 1"),
        ({"rank_ratio": 0}, "field 'params.rank_ratio': Input should be greater than 0"),
        ({"param_ratio": 2}, "field 'params.param_ratio': Input should be less than or equal to 1"),
        ({"energy": 0}, "field 'params.energy': Input should be greater than 0"),
        ({"energy": 1.01}, "field 'params.energy': Input should be less than or equal to 1"),
        ({"max_error": 1}, "field 'params.max_error': Input should be less than 1"),
        ({"max_error": -0.1}, "field 'params.max_error': Input should be greater than or equal"),
        ({"rank": 4, "method": "fast"}, "field 'params.method': Input should be 'auto', 'exact'"),
        ({"rank": 4, "niter": 21}, "field 'params.niter': Input should be less than or equal"),
        ({"rank": 4, "oversample": -1}, "field 'params.oversample': Input should be greater"),
    ],
)
def test_bad_param_value(factorize_registry, params, expected):
    (problem,) = problems_of({"rules": [rule(params)]}, factorize_registry)
    assert problem.startswith(f"rule 0 (match 'a'): {expected}")


def test_rank_options_at_their_limits_are_valid(factorize_registry):
    for params in ({"rank_ratio": 1}, {"param_ratio": 1}, {"energy": 1}, {"max_error": 0}):
        load_spec({"rules": [rule(params)]}, factorize_registry)


def test_bug_boolean_rank_is_rejected(factorize_registry):
    # JSON `true` is not a rank; pydantic's lax mode turns it into rank 1 silently.
    (problem,) = problems_of({"rules": [rule({"rank": True})]}, factorize_registry)
    assert problem.startswith("rule 0 (match 'a'): field 'params.rank': ")


def test_bad_regex(factorize_registry):
    (problem,) = problems_of({"rules": [rule(match="re:enc(oder")]}, factorize_registry)
    assert problem == (
        "rule 0 (match 're:enc(oder'): field 'match': bad regex 'enc(oder': "
        "missing ), unterminated subpattern at position 3"
    )


def test_bad_regex_in_exclude(factorize_registry):
    (problem,) = problems_of({"rules": [rule(exclude=["ok", "re:[x"])]}, factorize_registry)
    assert problem.startswith("rule 0 (match 'a'): field 'exclude': bad regex '[x'")


def test_empty_pattern(factorize_registry):
    (problem,) = problems_of({"rules": [rule(match="")]}, factorize_registry)
    assert problem == "rule 0 (match ''): field 'match': empty pattern"


def test_empty_rules(factorize_registry):
    assert problems_of({"version": 1, "rules": []}, factorize_registry) == [
        "spec: field 'rules': List should have at least 1 item after validation, not 0"
    ]


def test_match_missing(factorize_registry):
    bad = {"transform": "factorize", "params": {"rank": 4}}
    (problem,) = problems_of({"rules": [bad]}, factorize_registry)
    # names the rule by index; there is no pattern to show
    assert problem.startswith("rule 0 (")
    assert problem.endswith("field 'match': Field required")


def test_empty_match_list(factorize_registry):
    (problem,) = problems_of({"rules": [rule(match=[])]}, factorize_registry)
    assert problem.startswith("rule 0 (")
    assert "field 'match': List should have at least 1 item" in problem


def test_wrong_version(factorize_registry):
    assert problems_of({"version": 2, "rules": [rule()]}, factorize_registry) == [
        "spec: field 'version': Input should be 1"
    ]


def test_rule_that_is_not_an_object(factorize_registry):
    (problem,) = problems_of({"rules": [rule(), "factorize"]}, factorize_registry)
    assert problem.startswith("rule 1 (") and "valid dictionary" in problem


def test_params_that_are_not_an_object(factorize_registry):
    (problem,) = problems_of({"rules": [rule(params=[4])]}, factorize_registry)
    assert problem == "rule 0 (match 'a'): field 'params': Input should be a valid dictionary"


def test_rule_label_shows_two_patterns_then_ellipsis(factorize_registry):
    bad = rule(match=["x.a", "x.b", "x.c"], transform="fatorize")
    (problem,) = problems_of({"rules": [bad]}, factorize_registry)
    assert problem.startswith("rule 0 (match 'x.a', 'x.b', ...): field 'transform'")


def test_every_problem_reported_at_once(factorize_registry):
    raw = {
        "rules": [
            rule(transform="fatorize"),
            rule({"rnak": 4, "rank": 2}, match="x"),
            rule(match="y", mach="z"),
        ]
    }
    problems = problems_of(raw, factorize_registry)
    assert len(problems) == 3
    assert sorted(p.split(":")[0] for p in problems) == [
        "rule 0 (match 'a')",
        "rule 1 (match 'x')",
        "rule 2 (match 'y')",
    ]
    assert any("unknown transform 'fatorize'" in p for p in problems)
    assert any("unknown field 'params.rnak'" in p for p in problems)
    assert any("unknown field 'mach'" in p for p in problems)


def test_not_a_spec():
    with pytest.raises(SpecError, match="a spec is a dict, a path or a Spec, not int"):
        load_spec(42)


# --- files ------------------------------------------------------------------------------


def test_malformed_json_names_file_line_and_column(tmp_path, factorize_registry):
    path = tmp_path / "bad.json"
    path.write_text('{"rules": [\n  {"match": "a", "transform": "factorize",, "params": {}}\n]}\n')
    with pytest.raises(SpecError) as info:
        load_spec(path, factorize_registry)
    assert info.value.source == str(path)
    assert info.value.problems == [
        "not valid JSON: Expecting property name enclosed in double quotes at line 2, column 43"
    ]
    assert str(info.value).startswith(f"invalid spec in {path}: 1 problem\n")


def test_malformed_yaml_names_the_line(tmp_path, factorize_registry):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - match: a\n    transform: [factorize\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, factorize_registry)
    (problem,) = info.value.problems
    assert problem.startswith("not valid YAML")
    assert "line 3" in problem


def test_yaml_that_is_not_a_mapping(tmp_path, factorize_registry):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert problems_of(path, factorize_registry) == [
        "spec: expected an object with 'rules', got list"
    ]


def test_missing_file(tmp_path, factorize_registry):
    path = tmp_path / "nope.json"
    with pytest.raises(SpecError) as info:
        load_spec(path, factorize_registry)
    assert info.value.problems == [f"spec file not found: {path}"]
    assert info.value.source == str(path)


def test_errors_in_a_file_name_the_file(tmp_path, factorize_registry):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"rules": [rule({"rank": 0})]}))
    with pytest.raises(SpecError) as info:
        load_spec(path, factorize_registry)
    assert str(info.value) == (
        f"invalid spec in {path}: 1 problem\n"
        "  - rule 0 (match 'a'): field 'params.rank': Input should be greater than 0"
    )


# --- JSON Schema ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_validator():
    schema = json_schema(factorize_only_registry())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator, spec) -> list[str]:
    return [e.message for e in validator.iter_errors(spec)]


def test_schema_is_valid_json_schema_and_serialisable(schema_validator):
    schema = schema_validator.schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$defs"]["Rule"]["properties"]["transform"]["enum"] == ["factorize"]


def test_schema_accepts_a_good_spec(schema_validator):
    spec = {"$schema": "./schema.json", "version": 1, "rules": [rule(match=["a", "b.*"])]}
    assert schema_errors(schema_validator, spec) == []


def test_schema_accepts_a_single_pattern_string(schema_validator):
    # The issue's own example has `"match": "re:..."`; load_spec accepts it, so must the schema.
    assert schema_errors(schema_validator, GOOD) == []


@pytest.mark.parametrize(
    "params",
    [{"rank": -1}, {"rank": 0}, {"rank": 1.5}, {"rank": 4, "rnak": 4}, {"energy": 2}],
)
def test_schema_rejects_bad_factorize_params(schema_validator, params):
    spec = {"rules": [rule(params, match=["a"])]}
    assert schema_errors(schema_validator, spec) != []
    with pytest.raises(SpecError):
        load_spec(spec, factorize_only_registry())


def test_schema_rejects_unknown_transform_and_keys(schema_validator):
    assert schema_errors(schema_validator, {"rules": [rule(match=["a"], transform="x")]}) == [
        "'x' is not one of ['factorize']"
    ]
    assert schema_errors(schema_validator, {"rules": [rule(match=["a"])], "rule": []}) != []
    assert schema_errors(schema_validator, {"rules": [rule(match=["a"], mach="b")]}) != []
    assert schema_errors(schema_validator, {"version": 2, "rules": [rule(match=["a"])]}) != []
    assert schema_errors(schema_validator, {"rules": []}) != []
