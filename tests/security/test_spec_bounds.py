"""Issue 12, "untrusted files stay data": one test per attack on a spec file.

Each attack is refused as a :class:`~tnsurgery.errors.SpecError` that says what and
where, through :func:`tnsurgery.spec.load_spec` (file, and dict where it applies)
and through ``tnsurgery validate`` (exit code 2, never "Internal error"), quickly:
no regex, alias bomb or nesting exhausts the machine, and no class name in
``types`` is ever imported.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

import tnsurgery.cli  # noqa: F401  (registers the commands)
from tnsurgery.cli.app import cli
from tnsurgery.errors import SpecError
from tnsurgery.matching import MAX_PATTERN_LENGTH, compile_pattern, pattern_problem, type_matches
from tnsurgery.spec import load_spec
from tnsurgery.spec.bounds import MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_INT, MAX_SPEC_VALUES
from tnsurgery.targets import select_rule


def rule(**fields) -> dict:
    out = {"match": "fc*", "transform": "factorize", "params": {"rank": 4}}
    out.update(fields)
    return out


def spec(*rules: dict, **sections) -> dict:
    return {"version": 1, "rules": list(rules) or [rule()], **sections}


def refused(source, *expected: str) -> SpecError:
    """``load_spec(source)`` raises a SpecError whose message holds every ``expected``,
    fast."""
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(source)
    assert time.perf_counter() - start < 1.0
    text = str(info.value)
    for part in expected:
        assert part in text, text
    return info.value


def cli_refuses(path: Path, *expected: str) -> None:
    """``tnsurgery validate path``: exit code 2, a message, no internal error."""
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert time.perf_counter() - start < 1.0
    assert result.exit_code == 2, result.output
    assert "Internal error" not in result.output
    assert "Traceback" not in result.output
    for part in expected:
        assert part in result.output, result.output


def both(tmp_path: Path, data: dict, *expected: str) -> None:
    """The attack as a dict, as a JSON file, and through the CLI."""
    refused(data, *expected)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    refused(path, *expected)
    cli_refuses(path, *expected)


def text_file(tmp_path: Path, name: str, text: str, *expected: str) -> None:
    """The attack as a file's text (JSON or YAML), through load_spec and the CLI."""
    path = tmp_path / name
    path.write_text(text)
    refused(path, *expected)
    cli_refuses(path, *expected)


# --- patterns ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["match", "exclude"])
def test_regex_repetition_overflow(tmp_path, field):
    both(
        tmp_path,
        spec(rule(**{field: "re:a{99999999999}"})),
        "rule 0 (match",
        f"field '{field}'",
        "a{99999999999}",
        "repetition number is too large",
    )


def test_deeply_nested_regex(tmp_path):
    deep = "re:" + "(" * 5000 + ")" * 5000
    both(tmp_path, spec(rule(match=deep)), "rule 0", "field 'match'", "more than the limit")
    # within the length limit: accepted or refused, never a RecursionError
    nested = "re:" + "(" * 498 + ")" * 498
    try:
        load_spec(spec(rule(match=nested)))
    except SpecError as exc:
        assert "nested too deeply" in str(exc)


def test_regex_too_deep_for_the_parser_is_a_pattern_problem():
    old = sys.getrecursionlimit()
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    sys.setrecursionlimit(depth + 100)
    try:
        problem = pattern_problem("re:" + "(?:" * 200 + "x" + ")" * 200)
    finally:
        sys.setrecursionlimit(old)
    assert problem is not None and "nested too deeply" in problem


def test_bad_glob_range(tmp_path):
    both(
        tmp_path,
        spec(rule(match=["fc1", "fc[3-1]"])),
        "rule 0",
        "field 'match'",
        "bad glob pattern 'fc[3-1]'",
        "bad character range 3-1",
    )
    with pytest.raises(ValueError, match="bad glob pattern"):
        compile_pattern("fc[3-1]")  # at match time too: a ValueError, not re.error


def test_pattern_too_long(tmp_path):
    long = "a" * (MAX_PATTERN_LENGTH + 1)
    both(
        tmp_path,
        spec(rule(exclude=long)),
        "field 'exclude'",
        f"{MAX_PATTERN_LENGTH + 1} characters",
        f"the limit of {MAX_PATTERN_LENGTH}",
    )
    load_spec(spec(rule(match="a" * MAX_PATTERN_LENGTH)))  # at the limit: fine


@pytest.mark.parametrize("pattern", ["", "re:"])
def test_empty_patterns_are_refused(tmp_path, pattern):
    both(tmp_path, spec(rule(match=["fc1", pattern])), "rule 0", "field 'match'", "empty")


def test_unicode_patterns_are_patterns():
    s = load_spec(spec(rule(match=["编码器.层.*", "re:caf\u00e9\\.\\d+"], exclude="ü*")))
    assert s.rules[0].match == ["编码器.层.*", "re:caf\u00e9\\.\\d+"]
    assert compile_pattern("编码器.层.*").fullmatch("编码器.层.0")


def test_distill_match_patterns_are_compiled(tmp_path):
    training = {"data": {"source": "random", "shape": [4]}, "distill": {"match": ["re:(x"]}}
    both(tmp_path, spec(training=training), "training.distill.match", "bad regex '(x'")


# --- types -------------------------------------------------------------------------


class _RecordImports(importlib.abc.MetaPathFinder):
    """Records every import attempted of a module whose name starts with ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tried: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.startswith(self.prefix):
            self.tried.append(name)
        return None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)


def test_a_dotted_type_is_never_imported(tmp_path):
    finder = _RecordImports("tnsurgery_issue12_")
    sys.meta_path.insert(0, finder)
    sys.modules.pop("this", None)
    try:
        types = ["this.Linear", "tnsurgery_issue12_evil.Linear", "tnsurgery_issue12_pkg.sub.X"]
        data = spec(rule(types=types, allow_empty=True))
        s = load_spec(data)
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(data))
        result = CliRunner().invoke(cli, ["validate", str(path)])
        assert result.exit_code == 0, result.output
        # at match time too: the names match nothing, and nothing is imported
        assert select_rule(Net(), s.rules[0], 0).names == []
        assert not type_matches(nn.Linear(2, 2), types)
    finally:
        sys.meta_path.remove(finder)
    assert finder.tried == []
    assert "this" not in sys.modules


def test_a_dotted_type_of_an_imported_module_still_matches():
    assert type_matches(nn.Linear(2, 2), ["torch.nn.Linear"])  # alias, looked up
    assert type_matches(nn.Linear(2, 2), ["torch.nn.modules.linear.Linear"])  # exact path
    assert type_matches(nn.Linear(2, 2), ["Linear"])


@pytest.mark.parametrize("name", ["..Linear", "torch..Linear", "torch.nn.", "1x", "a b", "", "a-b"])
def test_a_type_that_is_not_a_name_is_refused(tmp_path, name):
    both(tmp_path, spec(rule(types=["Linear", name])), "rule 0", "field 'types'", "class name")
    assert not type_matches(nn.Linear(2, 2), [name])  # no crash at match time either


# --- YAML alias bombs --------------------------------------------------------------

LOL = ", ".join(["lol"] * 9)


def _levels(indent: str, first: str) -> str:
    """``l0: &l0 [lol x9]`` ... ``l9: [*l8 x9]``: 9**10 values once expanded."""
    lines = [f"{indent}l0: &l0 [{first}]"]
    for i in range(1, 10):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        anchor = f"&l{i} " if i < 9 else ""
        lines.append(f"{indent}l{i}: {anchor}[{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_in_match(tmp_path):
    lines = ["version: 1", "rules:", f"  - match: &m0 [{LOL}]", "    transform: factorize"]
    for i in range(1, 10):
        anchor = f"&m{i} " if i < 9 else ""
        refs = ", ".join([f"*m{i - 1}"] * 9)
        lines += [f"  - match: {anchor}[{refs}]", "    transform: factorize"]
    text_file(tmp_path, "bomb.yaml", "\n".join(lines) + "\n", f"more than {MAX_SPEC_VALUES} values")


def test_alias_bomb_in_data_kwargs(tmp_path):
    text = (
        "version: 1\n"
        "rules: [{match: 'fc*', transform: factorize, params: {rank: 4}}]\n"
        "calibration:\n"
        "  data:\n"
        "    source: callable\n"
        "    target: mymodule:batches\n"
        "    kwargs:\n" + _levels("      ", LOL)
    )
    text_file(tmp_path, "bomb.yaml", text, f"more than {MAX_SPEC_VALUES} values")


def test_alias_bomb_of_long_strings(tmp_path):
    # few values, but each a long string: the text, aliases expanded, is bounded too
    text = (
        "version: 1\n"
        "rules: [{match: 'fc*', transform: factorize, params: {rank: 4}}]\n"
        "calibration:\n"
        "  data:\n"
        "    source: callable\n"
        "    target: mymodule:batches\n"
        f"    kwargs: {{a: &s '{'x' * 100_000}', b: [{', '.join(['*s'] * 50)}]}}\n"
    )
    text_file(tmp_path, "bomb.yaml", text, f"more than {MAX_SPEC_BYTES} characters")


def test_merge_key_bomb(tmp_path):
    lines = ["version: 1", "x0: &x0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}"]
    for i in range(1, 10):
        merges = ", ".join([f"*x{i - 1}"] * 9)
        lines.append(f"x{i}: &x{i} {{<<: [{merges}], z{i}: 1}}")
    text_file(tmp_path, "merge.yaml", "\n".join(lines) + "\n", "merge keys", "more than")


def test_shared_objects_in_a_dict_are_counted_expanded():
    level = ["lol"] * 9
    for _ in range(9):
        level = [level] * 9
    data = spec(
        calibration={"data": {"source": "callable", "target": "m:f", "kwargs": {"x": level}}}
    )
    refused(data, f"more than {MAX_SPEC_VALUES} values")


def test_a_cycle_in_a_dict_is_too_deep():
    kwargs: dict = {}
    kwargs["self"] = kwargs
    data = spec(calibration={"data": {"source": "callable", "target": "m:f", "kwargs": kwargs}})
    refused(data, "calibration.data.kwargs.self", f"limit of {MAX_SPEC_DEPTH} levels")


# --- nesting -----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_SPEC_DEPTH + 1, 100_000])
def test_deep_nesting_json(tmp_path, depth):
    nested = "[" * depth + "]" * depth
    text = '{"version": 1, "rules": [{"match": "fc*", "transform": "factorize"}], '
    text += f'"description": {nested}}}'
    text_file(tmp_path, "deep.json", text, "nested deeper than the limit")


@pytest.mark.parametrize("depth", [MAX_SPEC_DEPTH + 1, 100_000])
def test_deep_nesting_yaml_flow(tmp_path, depth):
    text = "version: 1\nrules: [{match: 'fc*', transform: factorize}]\n"
    text += "description: " + "[" * depth + "]" * depth + "\n"
    text_file(tmp_path, "deep.yaml", text, "nested deeper than the limit", "line 3")


def test_deep_nesting_yaml_block(tmp_path):
    text = "version: 1\nrules: [{match: 'fc*', transform: factorize}]\ndescription:\n"
    text += "".join("  " * i + f"k{i}:\n" for i in range(1, 200)) + "  " * 200 + "x\n"
    text_file(tmp_path, "deep.yaml", text, "nested deeper than the limit")


def test_deep_nesting_dict():
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    refused(spec(description=nested), "field 'description", "nested deeper than the limit")


# --- numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_5000_digit_integer(tmp_path, suffix):
    digits = "9" * 5000
    text = (
        '{"version": 1, "rules": [{"match": "fc*", "transform": "factorize", '
        f'"params": {{"rank": {digits}}}}}]}}'
    )
    text_file(tmp_path, f"big{suffix}", text, "field 'params.rank'", "5000 characters")


@pytest.mark.parametrize(
    "where, data",
    [
        ("params.rank", spec(rule(params={"rank": 10**30}))),
        (
            "calibration.samples",
            spec(calibration={"data": {"source": "random", "shape": [4]}, "samples": -(10**20)}),
        ),
        (
            "training.steps",
            spec(training={"data": {"source": "random", "shape": [4]}, "steps": 2**64}),
        ),
        (
            "calibration.data.shape.0",
            spec(calibration={"data": {"source": "random", "shape": [10**18, 10**18]}}),
        ),
    ],
)
def test_huge_integers(tmp_path, where, data):
    both(tmp_path, data, f"field '{where}'", "too large", str(MAX_SPEC_INT))


def test_integer_at_the_limit_goes_to_the_field_constraints():
    ok = spec(rule(params={"rank": 4, "seed": MAX_SPEC_INT}, transform="factorize"))
    assert load_spec(ok).rules[0].parsed_params.seed == MAX_SPEC_INT


@pytest.mark.parametrize(
    "data, expected",
    [
        (spec(rule(params={"energy": float("nan")})), "field 'params.energy': nan"),
        (spec(rule(params={"rank_ratio": float("inf")})), "field 'params.rank_ratio': inf"),
        (spec(budget={"params": float("nan")}), "field 'budget.params': nan"),
        (
            spec(training={"data": {"source": "random", "shape": [4]}, "lr": float("-inf")}),
            "field 'training.lr': -inf",
        ),
        (
            spec(training={"data": {"source": "random", "shape": [4]}, "lr": -1e-3}),
            "field 'training.lr': Input should be greater than 0",
        ),
        (spec(rule(params={"rank": -3})), "field 'params.rank': Input should be greater than 0"),
        (
            spec(calibration={"data": {"source": "random", "shape": [4]}, "damping": -1.0}),
            "field 'calibration.damping'",
        ),
        (
            spec(training={"data": {"source": "random", "shape": [4]}, "steps": 0}),
            "field 'training.steps'",
        ),
    ],
)
def test_nan_infinity_and_negative_numbers(tmp_path, data, expected):
    both(tmp_path, data, expected)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_literals(tmp_path, literal):
    text = (
        '{"version": 1, "rules": [{"match": "fc*", "transform": "factorize", '
        f'"params": {{"energy": {literal}}}}}]}}'
    )
    text_file(tmp_path, "nan.json", text, "field 'params.energy'", "not a finite number")


@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf", "1e999"])
def test_yaml_nan_literals(tmp_path, literal):
    text = f"rules: [{{match: 'fc*', transform: factorize, params: {{energy: {literal}}}}}]\n"
    text_file(tmp_path, "nan.yaml", text, "field 'params.energy'")


# --- files -------------------------------------------------------------------------


def test_oversize_file(tmp_path):
    text = json.dumps(spec()) + " " * MAX_SPEC_BYTES
    text_file(tmp_path, "big.json", text, f"larger than the limit of {MAX_SPEC_BYTES} bytes")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_file_that_never_ends_is_read_no_further_than_the_limit():
    refused("/dev/zero", "larger than the limit")
    cli_refuses(Path("/dev/zero"), "larger than the limit")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
        ("rules: [{match: !!python/name:os.system a, transform: factorize}]\n", "not valid YAML"),
        ("rules: [{match: 'fc*', transform: factorize, params: {rank: !!int abc}}]\n", "YAML"),
        ("rules: [{match: 'fc*', transform: factorize, params: {rank: !!bool maybe}}]\n", "YAML"),
        ("rules: [{match: !!binary aGVsbG8=, transform: factorize}]\n", "bytes is not spec"),
        ("rules: [{match: 'fc*', transform: factorize}]\ndescription: !!set {a, b}\n", "set"),
        ("rules: [{match: 'fc*', transform: factorize, 1: x}]\n", "key 1 is a int"),
        ("rules: [{match: 'fc*', transform: factorize, on: x}]\n", "key True is a bool"),
        (
            "rules: [{match: 'fc*', transform: factorize}]\ndescription: !!timestamp 2024-13-45\n",
            "not valid YAML",
        ),
    ],
)
def test_yaml_that_is_not_plain_data(tmp_path, text, expected):
    text_file(tmp_path, "tags.yaml", text, expected)


def test_yaml_timestamps_stay_strings():
    path_text = "rules: [{match: 'fc*', transform: factorize, params: {rank: 2}}]\n"
    path_text += "description: 2024-13-45\n"
    assert load_spec_text(path_text).description == "2024-13-45"


def load_spec_text(text: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text)
        return load_spec(path)


def test_lone_surrogates_are_not_text(tmp_path):
    text = '{"rules": [{"match": "fc\\ud800", "transform": "factorize"}]}'
    text_file(tmp_path, "sur.json", text, "not valid Unicode")
    refused(spec(rule(match="fc\ud800")), "not valid Unicode")
