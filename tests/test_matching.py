"""Module-name patterns (glob, ``**``, ``re:``), exclude, type filters, on toy models and BERT."""

from __future__ import annotations

import pytest
from torch import nn

from tnsurgery.errors import MatchError
from tnsurgery.matching import MatchResult, compile_pattern, name_matches, select, type_matches
from tnsurgery.surgery import plan

NAMES = [
    "encoder",
    "encoder.layer",
    "encoder.layer.0",
    "encoder.layer.0.attention",
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.output.dense",
    "encoder.layer.1",
    "encoder.layer.1.output.dense",
    "encoder.layer.01.x",
    "encoder.layer.10.output.dense",
    "decoder.layer.0.output.dense",
    "pooler.dense",
]


def matched(pattern: str) -> list[str]:
    return [n for n in NAMES if compile_pattern(pattern).fullmatch(n)]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        # '*' is exactly one segment
        ("encoder.layer.*", ["encoder.layer.0", "encoder.layer.1"]),
        (
            "encoder.layer.*.output.dense",
            ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
            + ["encoder.layer.10.output.dense"],
        ),
        ("*.dense", ["pooler.dense"]),
        ("*", ["encoder"]),
        # fnmatch inside one segment
        ("encoder.layer.1*", ["encoder.layer.1"]),
        (
            "encoder.layer.1*.output.dense",
            [
                "encoder.layer.1.output.dense",
                "encoder.layer.10.output.dense",
            ],
        ),
        (
            "encoder.layer.?.output.dense",
            [
                "encoder.layer.0.output.dense",
                "encoder.layer.1.output.dense",
            ],
        ),
        ("encoder.layer.0.attention.self.q*", ["encoder.layer.0.attention.self.query"]),
        # '**' is any number of segments, zero included
        (
            "encoder.layer.0.**",
            [
                "encoder.layer.0",
                "encoder.layer.0.attention",
                "encoder.layer.0.attention.self.query",
                "encoder.layer.0.output.dense",
            ],
        ),
        (
            "**.output.dense",
            [
                "encoder.layer.0.output.dense",
                "encoder.layer.1.output.dense",
                "encoder.layer.10.output.dense",
                "decoder.layer.0.output.dense",
            ],
        ),
        ("**.dense", [n for n in NAMES if n.endswith(".dense")]),
        ("**", NAMES),
        ("pooler.**.dense", ["pooler.dense"]),
        ("encoder.**.query", ["encoder.layer.0.attention.self.query"]),
        ("encoder.**.0.**.query", ["encoder.layer.0.attention.self.query"]),
        # literal dots and names are not regex
        ("encoder.layer.0.output.dense", ["encoder.layer.0.output.dense"]),
        ("encoder.layer", ["encoder.layer"]),
        ("encoderXlayer", []),
        # 're:' is a full-match Python regex
        (
            "re:encoder\\.layer\\.\\d+\\.output\\.dense",
            [
                "encoder.layer.0.output.dense",
                "encoder.layer.1.output.dense",
                "encoder.layer.10.output.dense",
            ],
        ),
        ("re:.*dense", [n for n in NAMES if n.endswith("dense")]),
        ("re:dense", []),  # full match, not search
        ("re:encoder\\.layer\\.1", ["encoder.layer.1"]),
    ],
)
def test_pattern(pattern, expected):
    assert matched(pattern) == expected


def test_double_star_does_not_match_a_longer_segment():
    inside = [n for n in NAMES if n == "encoder.layer.0" or n.startswith("encoder.layer.0.")]
    assert matched("encoder.layer.0.**") == inside
    assert not compile_pattern("encoder.layer.0.**").fullmatch("encoder.layer.01.x")
    assert not compile_pattern("encoder.layer.0.**").fullmatch("encoder.layer.01")
    assert not compile_pattern("encoder.*").fullmatch("encoder.layer.0")


def test_star_never_crosses_a_dot():
    assert compile_pattern("a*b").fullmatch("axxb")
    assert not compile_pattern("a*b").fullmatch("ax.xb")
    assert not compile_pattern("a?b").fullmatch("a.b")


def test_regex_metacharacters_in_globs_are_literal():
    assert compile_pattern("a+b").fullmatch("a+b")
    assert not compile_pattern("a+b").fullmatch("aab")
    assert not compile_pattern("a.b").fullmatch("aXb")


def test_bug_fnmatch_character_class_within_segment():
    # the docstring promises fnmatch within a segment: [seq] and [!seq] are fnmatch too
    assert compile_pattern("encoder.layer.[01].output.dense").fullmatch(
        "encoder.layer.1.output.dense"
    )
    assert not compile_pattern("encoder.layer.[!01].output.dense").fullmatch(
        "encoder.layer.1.output.dense"
    )


def test_name_matches_any_of_several_patterns():
    assert name_matches("pooler.dense", ["encoder.**", "pooler.*"])
    assert not name_matches("pooler.dense", ["encoder.**", "re:pool"])
    assert not name_matches("pooler.dense", [])


# --- types ------------------------------------------------------------------------------


class MyLinear(nn.Linear):
    """A subclass: matches 'Linear' and 'torch.nn.Linear' too."""


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mine = MyLinear(4, 4)
        self.conv = nn.Conv2d(2, 2, 1)
        self.norm = nn.LayerNorm(4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())


@pytest.mark.parametrize(
    "types, expected",
    [
        ([], ["fc", "mine", "conv", "norm", "block", "block.0", "block.1"]),
        (["Linear"], ["fc", "mine", "block.0"]),
        (["torch.nn.Linear"], ["fc", "mine", "block.0"]),
        (["torch.nn.modules.linear.Linear"], ["fc", "mine", "block.0"]),
        (["MyLinear"], ["mine"]),
        ([f"{__name__}.MyLinear"], ["mine"]),
        (["Conv2d", "LayerNorm"], ["conv", "norm"]),
        (["torch.nn.Conv2d"], ["conv"]),
        (["Module"], ["fc", "mine", "conv", "norm", "block", "block.0", "block.1"]),
        (["linear"], []),  # class names are case-sensitive
        (["nosuch.module.Linear"], []),  # unimportable: no match, no error
        (["torch.nn.functional"], []),  # not a class
    ],
)
def test_type_matches(types, expected):
    model = Toy()
    got = [n for n, m in model.named_modules() if n and type_matches(m, types)]
    assert got == expected


def test_select_excludes_wrong_types_and_root():
    model = Toy()
    res = select(model, ["**"], ["block.**"], ["Linear"], (nn.Linear, nn.Conv2d))
    assert res.names == ["fc", "mine"]
    assert res.excluded == ["block", "block.0", "block.1"]
    assert res.wrong_type == ["conv", "norm"]  # conv is accepted but filtered by types


def test_select_filters_by_the_transforms_accepted_types():
    model = Toy()
    res = select(model, ["*"], [], [], (nn.Conv2d,))
    assert res.names == ["conv"]
    assert res.wrong_type == ["fc", "mine", "norm", "block"]


def test_near_misses_are_the_closest_names():
    names = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense", "pooler.dense"]
    near = MatchResult().near_misses(names, ["encoder.layer.0.output.dens"], n=2)
    assert near[0] == "encoder.layer.0.output.dense"
    assert len(near) == 2


# --- the issue's example, on a real (small) Hugging Face BERT --------------------------


def bert_select(model, rule: dict) -> MatchResult:
    def as_list(v):
        return [v] if isinstance(v, str) else list(v)

    return select(
        model,
        as_list(rule["match"]),
        as_list(rule.get("exclude", [])),
        as_list(rule.get("types", [])),
        (nn.Linear, nn.Conv2d),
    )


ISSUE_RULES = [
    {
        "match": ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"],
        "exclude": ["encoder.layer.0.**"],
        "types": ["Linear"],
        "transform": "factorize",
        "params": {"rank": 16},
    },
    {
        "match": "re:.*attention\\.self\\.(query|key|value)$",
        "transform": "factorize",
        "params": {"energy": 0.95},
    },
]


def test_issue_example_selects_exactly(tiny_bert):
    first = bert_select(tiny_bert, ISSUE_RULES[0])
    assert first.names == ["encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    assert first.excluded == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    assert first.wrong_type == []
    # '*' is one segment: the attention's own output.dense is not matched
    assert "encoder.layer.1.attention.output.dense" not in first.names

    second = bert_select(tiny_bert, ISSUE_RULES[1])
    assert second.names == [
        f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value")
    ]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("encoder.layer.*.attention.output.dense", [0, 1]),
        ("**.attention.**.dense", [0, 1]),
        ("encoder.layer.1*.attention.output.dense", [1]),
        ("re:encoder\\.layer\\.[1]\\.attention\\.output\\.dense", [1]),
    ],
)
def test_bert_attention_output(tiny_bert, pattern, expected):
    res = bert_select(tiny_bert, {"match": pattern})
    assert res.names == [f"encoder.layer.{i}.attention.output.dense" for i in expected]


def test_bert_every_linear(tiny_bert):
    res = bert_select(tiny_bert, {"match": "**", "types": ["torch.nn.Linear"]})
    per_layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    expected = [f"encoder.layer.{i}.{n}" for i in (0, 1) for n in per_layer] + ["pooler.dense"]
    assert res.names == expected
    # embeddings and LayerNorms matched the pattern but are not Linear
    assert "embeddings.word_embeddings" in res.wrong_type
    assert "encoder.layer.0.output.LayerNorm" in res.wrong_type


def test_issue_example_plan_on_bert(tiny_bert, factorize_registry):
    """The example spec, end to end through the planner: the same targets, in rule order."""
    result = plan(tiny_bert, {"version": 1, "rules": ISSUE_RULES}, registry=factorize_registry)
    by_rule = {0: [], 1: []}
    for t in result.targets:
        by_rule[t.rule_index].append(t.name)
    assert by_rule[0] == ["encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    assert by_rule[1] == [
        f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value")
    ]
    assert [p.matched for p in result.passes] == [2, 6]
    assert [p.excluded for p in result.passes] == [2, 0]
    # rank 16 of a 32x64 layer shrinks it: 16 * (32 + 64) < 32 * 64
    assert {t.resolved["rank"] for t in result.targets if t.rule_index == 0} == {16}


def test_rule_matching_nothing_lists_closest_names(tiny_bert, factorize_registry):
    spec = {
        "rules": [
            {
                "match": "encoder.layers.*.output.dense",
                "transform": "factorize",
                "params": {"rank": 2},
            }
        ]
    }
    with pytest.raises(MatchError) as info:
        plan(tiny_bert, spec, registry=factorize_registry)
    (problem,) = info.value.problems
    assert problem.startswith("rule 0 (match 'encoder.layers.*.output.dense')")
    assert "matches no" in problem
    assert "encoder.layer.0.output.dense" in problem  # among the closest names
    assert "allow_empty" in problem
    spec["rules"][0]["allow_empty"] = True
    assert plan(tiny_bert, spec, registry=factorize_registry).targets == []


def test_parts_of_a_surgered_layer_are_never_targets():
    """A second ``**`` rule must not split the convs inside a LowRankConv2d."""
    import torch

    from tnsurgery import surgery
    from tnsurgery.layers.lowrank import LowRankConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    spec = {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}]}
    small = surgery.apply(model, spec)
    assert isinstance(small[0], LowRankConv2d)
    found = select(small, ["**"], [], ["Conv2d"], (nn.Conv2d,))
    assert found.names == ["2"]
    assert all(not n.startswith("0.") for n in found.names + found.wrong_type)
