"""Issue 12, property-based: whatever a spec holds, validating it either accepts it or
refuses it with a :class:`~tnsurgery.errors.SpecError` (``tnsurgery validate``: exit
code 0 or 2), never anything else.

The specs are generated from the real fields: rules (``match``, ``exclude``,
``types``, ``transform``, ``params`` of the built-in transforms ``factorize``, ``tt``,
``cp``, ``tucker``, ``qat``, named from their params models), ``budget``,
``calibration`` and ``training`` (fields from the spec models, data sources from the
registry), valid values mixed with broken ones: wrong types, unknown keys,
NaN/Infinity, negative and huge numbers, unicode, empty and bad patterns (bad
regexes, bad glob ranges, huge repetitions), deep nesting.

Examples per run (about 5 800 in all, some 25-40 s on a 2-core machine):

- ``test_dict_specs_are_accepted_or_refused``: 1 500 dicts through ``load_spec``;
- ``test_spec_files_are_accepted_or_refused``: 600 specs written as JSON and as YAML;
- ``test_validate_command_exits_0_or_2``: 400 spec files through ``tnsurgery validate``;
- ``test_any_text_is_accepted_or_refused``: 600 files of YAML or JSON fragments;
- ``test_patterns_compile_or_are_a_problem``: 1 000 patterns;
- ``test_type_names_never_import``: 500 class names;
- ``test_glob_matching_is_unchanged_by_the_backtracking_bound``: 1 000 globs, each
  on up to 8 names, against the plain translation;
- ``test_the_strategies_reach_both_outcomes``: 200 specs, some valid, some not.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tnsurgery.cli  # noqa: F401  (registers the commands)
from tnsurgery.cli.app import cli
from tnsurgery.errors import SpecError
from tnsurgery.matching import (
    MAX_PATTERN_LENGTH,
    compile_pattern,
    pattern_problem,
    type_matches,
    type_name_problem,
)
from tnsurgery.plugins import get_registry
from tnsurgery.spec import Spec, load_spec
from tnsurgery.spec.bounds import MAX_SPEC_DEPTH, MAX_SPEC_INT
from tnsurgery.spec.model import Budget, Calibration
from tnsurgery.spec.training import (
    CheckpointOptions,
    DistillOptions,
    ProgressiveRank,
    Training,
    TTOptions,
)

REGISTRY = get_registry()
TRANSFORMS = ["factorize", "tt", "cp", "tucker", "qat"]
SOURCES = sorted(REGISTRY.data_sources)
SETTINGS = dict(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
NAMES = ["fc1", "encoder.layer.0.output.dense", "编码器.层.10", "a.b.c.d.e.f.g.h.i.j"]

# --- values ------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-3, 300),
    st.integers(-(10**40), 10**40),
    st.sampled_from([0, -1, MAX_SPEC_INT, MAX_SPEC_INT + 1, -(MAX_SPEC_INT + 1), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"), -float("inf")]),
)
texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab.*?[]!-^re:()\\{}|+", max_size=16),
    st.sampled_from(["", "\ud800", "fc\udfff", "\x00", "é", "编码器", "a" * 2000]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def nested(draw, value: st.SearchStrategy) -> Any:
    """``value`` wrapped in lists/objects, around the depth limit."""
    out = draw(value)
    for _ in range(draw(st.integers(0, MAX_SPEC_DEPTH + 8))):
        out = [out] if draw(st.booleans()) else {"k": out}
    return out


anything = st.one_of(scalars, json_values, nested(scalars))


def maybe_broken(value: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``value``, sometimes anything at all."""
    return st.one_of(value, value, value, anything)


# --- patterns and class names --------------------------------------------------------

globs = st.lists(
    st.one_of(
        st.sampled_from(["*", "**", "?", "fc*", "layer", "[01]", "[!0]", "[3-1]", "[a-", "0"]),
        st.text(alphabet="abc01*?[]!-", min_size=1, max_size=5),
    ),
    min_size=1,
    max_size=5,
).map(".".join)
regexes = st.one_of(
    st.text(alphabet="ab.*+?()[]{}|\\^$0-9:,<>=!P", max_size=20),
    st.sampled_from(
        ["a{99999999999}", "(" * 600 + ")" * 600, "(?P<x", "[z-a]", ".*attention", "(a+)+"]
    ),
).map(lambda r: "re:" + r)
patterns = st.one_of(globs, regexes, texts, st.just(""), st.just("x" * (MAX_PATTERN_LENGTH + 1)))
pattern_fields = st.one_of(patterns, st.lists(patterns, max_size=3))
type_names = st.one_of(
    st.sampled_from(["Linear", "Conv2d", "torch.nn.Linear", "LowRankLinear", "Module"]),
    st.sampled_from(["this.Linear", "..Linear", "torch..X", "os.path.X", "zz_fake.mod.Cls"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[A-Za-z_][A-Za-z0-9_]{0,6}){0,3}", fullmatch=True),
    texts,
)


# --- spec sections, from the real fields ---------------------------------------------


def fields_of(model) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


@st.composite
def section(draw, fields: list[str], value: st.SearchStrategy = numbers) -> dict:
    """Some of ``fields`` with plausible or broken values, maybe an unknown key."""
    keys = draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True))
    out = {k: draw(maybe_broken(st.one_of(value, texts, st.booleans()))) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(min_size=1, max_size=8))] = draw(anything)
    return out


@st.composite
def params_of(draw, transform: str) -> dict:
    model = (
        REGISTRY.transforms[transform].params_model if transform in REGISTRY.transforms else None
    )
    fields = fields_of(model) if model else ["rank"]
    small = st.one_of(
        st.integers(1, 8), st.floats(0.05, 1), st.lists(st.integers(1, 4), max_size=4)
    )
    return draw(section(fields, st.one_of(small, numbers)))


@st.composite
def rules(draw) -> dict:
    transform = draw(st.one_of(st.sampled_from(TRANSFORMS), texts))
    out: dict[str, Any] = {"match": draw(pattern_fields), "transform": transform}
    if draw(st.booleans()):
        out["exclude"] = draw(pattern_fields)
    if draw(st.booleans()):
        out["types"] = draw(st.one_of(type_names, st.lists(type_names, max_size=3)))
    if draw(st.integers(0, 4)):
        out["params"] = draw(maybe_broken(params_of(transform)))
    if draw(st.integers(0, 4)) == 0:
        out["allow_empty"] = draw(maybe_broken(st.booleans()))
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from(["matchs", "transfrom", "param", "x"]))] = draw(anything)
    return out


@st.composite
def data_sources(draw) -> dict:
    source = draw(st.one_of(st.sampled_from(SOURCES), texts))
    model = REGISTRY.data_sources[source].params_model if source in REGISTRY.data_sources else None
    fields = fields_of(model) if model else ["path"]
    values = st.one_of(st.lists(st.integers(-2, 8), max_size=3), texts, numbers, json_values)
    out = {"source": source, **draw(section(fields, values))}
    if "kwargs" in out and draw(st.booleans()):
        out["kwargs"] = draw(st.dictionaries(st.text(max_size=6), anything, max_size=4))
    return out


@st.composite
def calibrations(draw) -> dict:
    out = draw(section(fields_of(Calibration)))
    out["data"] = draw(maybe_broken(data_sources()))
    return out


@st.composite
def trainings(draw) -> dict:
    out = draw(section(fields_of(Training)))
    out["data"] = draw(maybe_broken(data_sources()))
    subs = {
        "distill": DistillOptions,
        "checkpoint": CheckpointOptions,
        "tt": TTOptions,
        "progressive_rank": ProgressiveRank,
    }
    for name, model in subs.items():
        if draw(st.integers(0, 3)) == 0:
            sub = draw(section(fields_of(model)))
            if name == "distill" and draw(st.booleans()):
                sub["match"] = draw(st.lists(patterns, max_size=3))
            out[name] = sub
    if draw(st.integers(0, 4)) == 0:
        out["eval_data"] = draw(maybe_broken(data_sources()))
    return out


@st.composite
def specs(draw) -> dict:
    out: dict[str, Any] = {}
    if draw(st.integers(0, 4)):
        out["version"] = draw(maybe_broken(st.just(1)))
    out["rules"] = draw(maybe_broken(st.lists(rules(), min_size=1, max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        budget = draw(section(fields_of(Budget), st.floats(0, 1.5)))
        if draw(st.booleans()):
            budget["rules"] = draw(st.lists(st.one_of(st.integers(-2, 4), anything), max_size=3))
        out["budget"] = budget
    if draw(st.integers(0, 3)) == 0:
        out["calibration"] = draw(maybe_broken(calibrations()))
    if draw(st.integers(0, 3)) == 0:
        out["training"] = draw(maybe_broken(trainings()))
    if draw(st.integers(0, 5)) == 0:
        out["description"] = draw(anything)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=8))] = draw(anything)
    return out


# --- valid specs, and valid specs with one thing broken ----------------------------

rank_option = st.one_of(
    st.builds(lambda v: {"rank": v}, st.integers(1, 64)),
    st.builds(lambda v: {"rank_ratio": v}, st.floats(0.01, 1)),
    st.builds(lambda v: {"param_ratio": v}, st.floats(0.01, 1)),
    st.builds(lambda v: {"energy": v}, st.floats(0.01, 1)),
    st.builds(lambda v: {"max_error": v}, st.floats(0, 0.99)),
)
valid_params = {
    "factorize": st.builds(
        lambda r, extra: {**r, **extra},
        rank_option,
        st.fixed_dictionaries(
            {},
            optional={
                "method": st.sampled_from(["auto", "exact", "gram", "randomized"]),
                "niter": st.integers(0, 20),
                "seed": st.integers(-5, 2**31),
                "whiten": st.booleans(),
            },
        ),
    ),
    "tt": st.builds(
        lambda r, extra: {**r, **extra},
        st.one_of(rank_option, st.builds(lambda v: {"ranks": v}, st.integers(1, 8))),
        st.fixed_dictionaries({}, optional={"d": st.integers(2, 4)}),
    ),
    "cp": st.builds(
        lambda r, extra: {**r, **extra},
        rank_option,
        st.fixed_dictionaries({}, optional={"als_iters": st.integers(1, 50)}),
    ),
    "tucker": st.builds(
        lambda r, extra: {**r, **extra},
        rank_option,
        st.fixed_dictionaries({}, optional={"hooi_iters": st.integers(0, 5)}),
    ),
    "qat": st.fixed_dictionaries(
        {},
        optional={
            "bits": st.integers(2, 8),
            "scheme": st.sampled_from(["symmetric", "asymmetric"]),
            "activations": st.integers(2, 8),
        },
    ),
}
good_globs = st.sampled_from(["fc*", "**", "encoder.layer.*.output.dense", "layer.[01].*", "*"])
good_regexes = st.sampled_from(["re:.*attention\\.self\\.(query|key)$", "re:fc\\d+"])
good_patterns = st.one_of(good_globs, good_regexes, st.just("编码器.*"))


@st.composite
def valid_rules(draw, budgeted: bool = False) -> dict:
    transform = "factorize" if budgeted else draw(st.sampled_from(TRANSFORMS))
    out: dict[str, Any] = {
        "match": draw(st.one_of(good_patterns, st.lists(good_patterns, min_size=1, max_size=3))),
        "transform": transform,
    }
    params = {} if budgeted else draw(valid_params[transform])
    if params or draw(st.booleans()):
        out["params"] = params
    if draw(st.booleans()):
        out["exclude"] = draw(st.lists(good_patterns, max_size=2))
    if draw(st.booleans()):
        out["types"] = draw(st.lists(st.sampled_from(["Linear", "torch.nn.Linear"]), max_size=2))
    return out


random_data = st.fixed_dictionaries(
    {"source": st.just("random"), "shape": st.lists(st.integers(1, 8), min_size=1, max_size=3)},
    optional={"samples": st.integers(1, 64)},
)


@st.composite
def valid_specs(draw) -> dict:
    budgeted = draw(st.integers(0, 4)) == 0
    out: dict[str, Any] = {
        "version": 1,
        "rules": draw(st.lists(valid_rules(budgeted), min_size=1, max_size=3)),
    }
    if budgeted:
        out["budget"] = {draw(st.sampled_from(["params", "flops"])): draw(st.floats(0.05, 1))}
    if draw(st.booleans()):
        out["calibration"] = {
            "data": draw(random_data),
            "samples": draw(st.integers(1, 512)),
            "damping": draw(st.floats(0, 1)),
        }
    if draw(st.booleans()):
        out["training"] = {
            "data": draw(random_data),
            "steps": draw(st.integers(1, 1000)),
            "lr": draw(st.floats(1e-6, 1)),
            "distill": {"match": draw(st.lists(good_patterns, max_size=2))},
        }
    if draw(st.booleans()):
        out["description"] = draw(st.text(max_size=20))
    return out


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*path, i))
    return out


@st.composite
def broken_specs(draw) -> dict:
    """A valid spec with one to three things broken: a value replaced by anything, a key
    dropped, an unknown key added, a value nested deep."""
    spec = draw(valid_specs())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(spec)))
        if not path:
            spec = {**spec, draw(st.text(max_size=6)): draw(anything)}
            continue
        *head, last = path
        parent = spec
        for key in head:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "drop", "unknown", "nest"]))
        if op == "replace":
            parent[last] = draw(anything)
        elif op == "drop" and isinstance(parent, dict):
            del parent[last]
        elif op == "unknown" and isinstance(parent[last], dict):
            parent[last][draw(st.text(min_size=1, max_size=6))] = draw(anything)
        else:
            parent[last] = draw(nested(st.just(parent[last])))
    return spec


all_specs = st.one_of(valid_specs(), broken_specs(), broken_specs(), specs())


# --- the properties ----------------------------------------------------------------


def accepted_or_refused(source) -> Spec | None:
    try:
        spec = load_spec(source, REGISTRY)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        str(exc).encode("utf-8")  # printable
        return None
    assert spec.resolved
    json.dumps(spec.to_dict(), allow_nan=False)  # what the manifest records
    return spec


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("specs")


def write(folder: Path, data: Any, fmt: str) -> Path | None:
    """``data`` as a JSON or YAML file (``None`` when the test cannot write it so)."""
    try:
        text = json.dumps(data) if fmt == "json" else yaml.safe_dump(data, allow_unicode=False)
    except (ValueError, yaml.YAMLError, RecursionError):
        return None
    path = folder / f"spec.{fmt}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@settings(max_examples=1500, **SETTINGS)
@given(all_specs)
def test_dict_specs_are_accepted_or_refused(data):
    accepted_or_refused(data)


@settings(max_examples=600, **SETTINGS)
@given(data=all_specs)
def test_spec_files_are_accepted_or_refused(files, data):
    for fmt in ("json", "yaml"):
        path = write(files, data, fmt)
        if path is not None:
            accepted_or_refused(path)


@settings(max_examples=400, **SETTINGS)
@given(data=all_specs, fmt=st.sampled_from(["json", "yaml"]))
def test_validate_command_exits_0_or_2(files, data, fmt):
    path = write(files, data, fmt)
    if path is None:
        return
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert "Internal error" not in result.output
    assert "Traceback" not in result.output


@settings(max_examples=1000, **SETTINGS)
@given(patterns)
def test_patterns_compile_or_are_a_problem(pattern):
    problem = pattern_problem(pattern)
    if problem is not None:
        with pytest.raises(ValueError):
            compile_pattern(pattern)
        return
    regex = compile_pattern(pattern)
    for name in NAMES:
        regex.fullmatch(name)


@settings(max_examples=500, **SETTINGS)
@given(type_names)
def test_type_names_never_import(name):
    before = {m.partition(".")[0] for m in sys.modules}
    ok = type_name_problem(name) is None
    type_matches(nn.Linear(2, 2), [name])
    after = {m.partition(".")[0] for m in sys.modules}
    assert after <= before  # no new top-level module imported
    if not ok:
        with pytest.raises(SpecError):
            load_spec({"rules": [{"match": "a", "transform": "qat", "types": name}]}, REGISTRY)


# fmt: off
YAML_TOKENS = [
    "rules:", "rules: [{match: 'fc*', transform: factorize, params: {rank: 4}}]\n", "match: ",
    "transform: ", "factorize", "params: ", "{", "}", "[", "]", ", ", ": ", "- ", "? ", "\n",
    "  ", "&a ", "*a", "&b ", "*b", "<<: ", "<<: [*a, *a]", "!!int ", "!!float ", "!!bool ",
    "!!str ", "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!python/name:os.system ",
    "!!python/object/apply:os.system ", "!custom ", "'fc*'", '"\\ud800"', "1e999", ".nan",
    ".inf", "-.inf", "9" * 45, "0x1f", "0b101", "1:2:3", "2024-13-45", "yes", "on", "null",
    "~", "%YAML 1.1\n", "---\n", "...\n", "#", "|\n", ">\n", "\t", "\x00", "é",
]
JSON_TOKENS = [
    '{"rules": [{"match": "fc*", "transform": "factorize", "params": {"rank": 4}}]}',
    "{", "}", "[", "]", ",", ":", '"rules"', '"match"', '"transform"', '"params"', '"rank"',
    '"factorize"', '"fc*"', "NaN", "Infinity", "-Infinity", "9" * 5000, "1e999", "-0", "true",
    "null", '"\\ud800"', '"\\u0000"', "[" * 40, "]" * 40, " ", "\n", "\ufeff",
]
# fmt: on


@settings(max_examples=600, **SETTINGS)
@given(
    fmt=st.sampled_from(["yaml", "json"]),
    tokens=st.data(),
)
def test_any_text_is_accepted_or_refused(files, fmt, tokens):
    """Files of YAML or JSON fragments (tags, anchors, merge keys, odd scalars)."""
    vocabulary = YAML_TOKENS if fmt == "yaml" else JSON_TOKENS
    text = "".join(tokens.draw(st.lists(st.sampled_from(vocabulary), max_size=30)))
    path = files / f"fragments.{fmt}"
    path.write_text(text, encoding="utf-8")
    accepted_or_refused(path)


def _old_glob_regex(pattern: str) -> str:
    """The glob translation before issue 12 (plain backtracking): the oracle."""
    out, need_dot, parts = "", False, pattern.split(".")
    for i, seg in enumerate(parts):
        if seg == "**":
            if i == len(parts) - 1:
                out += r"(?:\.[^.]+)*" if need_dot else r"(?:[^.]+(?:\.[^.]+)*)?"
            else:
                out += r"(?:\.[^.]+)*\." if need_dot else r"(?:[^.]+\.)*"
            need_dot = False
            continue
        out += r"\." if need_dot else ""
        body, j = [], 0
        while j < len(seg):
            ch = seg[j]
            if ch == "*":
                body.append("[^.]*")
            elif ch == "?":
                body.append("[^.]")
            elif ch == "[" and (end := seg.find("]", j + 2)) != -1:
                inner = seg[j + 1 : end]
                neg = inner.startswith("!")
                chars = re.escape(inner[1:] if neg else inner).replace(r"\-", "-")
                body.append(f"[^.{chars}]" if neg else f"(?!\\.)[{chars}]")
                j = end
            else:
                body.append(re.escape(ch))
            j += 1
        out += "".join(body)
        need_dot = True
    return out


small_globs = st.lists(
    st.one_of(
        st.sampled_from(["*", "**", "?"]), st.text(alphabet="aab***?[]!-", min_size=1, max_size=8)
    ),
    min_size=1,
    max_size=6,
).map(".".join)
small_names = st.lists(
    st.text(alphabet="aab-!", min_size=1, max_size=6), min_size=1, max_size=7
).map(".".join)


@settings(max_examples=1000, **SETTINGS)
@given(small_globs, st.lists(small_names, min_size=1, max_size=8))
def test_glob_matching_is_unchanged_by_the_backtracking_bound(glob, names):
    """The glob translation that cannot backtrack exponentially matches exactly the
    names the plain one did."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = re.compile(_old_glob_regex(glob))
    except re.error:
        assert pattern_problem(glob) is not None
        return
    new = compile_pattern(glob)
    for name in names:
        assert bool(new.fullmatch(name)) == bool(old.fullmatch(name)), (glob, name)


def test_the_strategies_reach_both_outcomes():
    """A sanity check of the generators: some valid specs, some invalid ones."""
    seen = set()

    @settings(max_examples=200, **SETTINGS)
    @given(all_specs)
    def probe(data):
        seen.add(accepted_or_refused(data) is not None)

    probe()
    assert seen == {True, False}
