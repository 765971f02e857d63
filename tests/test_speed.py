"""``tnsurgery.speed`` and ``tnsurgery bench``: every replacement timed against the layer it
replaced, at each token count.

No assertion says which side is faster (CPU timings on a shared machine are noise at
this size): the tests check the structure (a row per replaced target and token count,
the inputs each pair ran on), the arithmetic (ratio = replacement / original, totals
are sums) and the FLOP ratios against an independent count and the plan's.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import factorize_only_registry, linear_with_weight, trained_like
from torch import nn

from tnsurgery import speed, surgery
from tnsurgery.cli import cli
from tnsurgery.cli.speed import build_and_time
from tnsurgery.errors import UserInputError
from tnsurgery.plan import Plan
from tnsurgery.spec import load_spec
from tnsurgery.surgery import get_manifest

QUICK = {"budget_s": 0.0}  # the minimum rounds only: structure, not figures
TOKENS = (1, 16, 64)
CUDA = torch.cuda.is_available()


def factorize_spec(params: dict, match: str = "*", types=("Linear",)) -> dict:
    rule = {"match": match, "types": list(types), "transform": "factorize", "params": params}
    return {"version": 1, "rules": [rule]}


def mlp() -> nn.Sequential:
    """Two 256x256 Linears (the same shapes: timed once) and a 256->64 one."""
    layers = [linear_with_weight(trained_like(256, 256, seed=s)) for s in (1, 2)]
    last = linear_with_weight(trained_like(64, 256, seed=3))
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), last).eval()


@pytest.fixture(scope="module")
def mlp_pair():
    model = mlp()
    spec = factorize_spec({"param_ratio": 0.25})
    surgered = surgery.apply(model, spec, torch.randn(4, 256), registry=factorize_only_registry())
    return model, surgered


def dense_flops(rows: int, fin: int, fout: int) -> int:
    return 2 * rows * fin * fout


# --- the library ---------------------------------------------------------------------------


def test_a_row_per_replaced_target_and_token_count(mlp_pair):
    model, surgered = mlp_pair
    report = speed.measure(model, surgered, TOKENS, **QUICK)
    assert report.device == "cpu" and report.tokens == list(TOKENS)
    assert [t.name for t in report.targets] == ["0", "2", "4"]
    for ts in report.targets:
        assert ts.timed and ts.reason is None
        assert (ts.module_type, ts.replacement, ts.transforms) == (
            "Linear",
            "LowRankLinear",
            ["factorize"],
        )
        assert [tm.tokens for tm in ts.timings] == list(TOKENS)
        fin = model.get_submodule(ts.name).in_features
        fout = model.get_submodule(ts.name).out_features
        rank = surgered.get_submodule(ts.name).rank
        assert ts.resolved["rank"] == rank
        for tm in ts.timings:
            assert tm.input_shape == (tm.tokens, fin)
            assert tm.original_s > 0 and tm.replacement_s > 0
            assert tm.ratio == pytest.approx(tm.replacement_s / tm.original_s)
            assert tm.slower == (tm.replacement_s > tm.original_s)
            assert tm.repeats >= speed.measuring.MIN_ROUNDS and tm.calls_per_repeat >= 1
            # an independent count: two thin GEMMs against the dense one
            assert tm.flops_before == dense_flops(tm.tokens, fin, fout)
            assert tm.flops_after == 2 * tm.tokens * rank * (fin + fout)
        # a Linear's FLOP ratio does not depend on the token count: the plan's
        assert ts.flop_ratio == pytest.approx(ts.plan_flop_ratio)


def test_flop_ratio_is_the_plans(mlp_pair):
    model, surgered = mlp_pair
    report = speed.measure(model, surgered, (8,), **QUICK)
    planned = {t.name: t for t in Plan.from_dict(get_manifest(surgered)["plan"]).replaced()}
    for ts in report.targets:
        tp = planned[ts.name]
        assert ts.timings[0].flop_ratio == pytest.approx(tp.flops_after / tp.flops_before)


def test_layers_of_the_same_shapes_are_timed_once(mlp_pair):
    model, surgered = mlp_pair
    report = speed.measure(model, surgered, (1, 4), **QUICK)
    first, second, last = report.targets
    assert second.same_as == "0" and second.timings == first.timings
    assert first.same_as is None and last.same_as is None  # 256->64: other shapes


def test_totals_are_sums_and_slower_lists_follow_the_flags(mlp_pair):
    model, surgered = mlp_pair
    report = speed.measure(model, surgered, TOKENS, **QUICK)
    totals = report.totals()
    assert [row["tokens"] for row in totals] == list(TOKENS)
    for row in totals:
        at = [tm for ts in report.targets for tm in ts.timings if tm.tokens == row["tokens"]]
        assert row["targets"] == 3
        assert row["original_s"] == pytest.approx(sum(tm.original_s for tm in at))
        assert row["replacement_s"] == pytest.approx(sum(tm.replacement_s for tm in at))
        assert row["ratio"] == pytest.approx(row["replacement_s"] / row["original_s"])
        flops = sum(tm.flops_after for tm in at) / sum(tm.flops_before for tm in at)
        assert row["flop_ratio"] == pytest.approx(flops)
    slower = report.slower()
    for ts in report.targets:
        flags = [tm.slower for tm in ts.timings]
        assert (ts.name in slower["every"]) == all(flags)
        assert (ts.name in slower["some"]) == (any(flags) and not all(flags))


def test_report_json_has_stable_keys(mlp_pair):
    model, surgered = mlp_pair
    data = json.loads(json.dumps(speed.measure(model, surgered, (2,), **QUICK).to_dict()))
    assert set(data) == {"device", "device_name", "threads", "torch", "tokens", "targets"} | {
        "totals",
        "slower",
    }
    target = data["targets"][0]
    assert set(target) == {
        "name",
        "module_type",
        "replacement",
        "transform",
        "resolved",
        "dtype",
        "flop_ratio",
        "plan_flop_ratio",
        "timed",
        "reason",
        "same_as",
        "timings",
    }
    assert set(target["timings"][0]) == {
        "tokens",
        "input_shape",
        "original_s",
        "replacement_s",
        "ratio",
        "flops_before",
        "flops_after",
        "flop_ratio",
        "slower",
        "repeats",
        "calls_per_repeat",
    }
    assert set(data["slower"]) == {"every", "some"}


def test_models_are_left_as_they_were(mlp_pair):
    model, surgered = mlp_pair
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        speed.measure(model, surgered, (1,), **QUICK)
        assert all(m.training for m in model.modules())
        assert not any(m.training for m in surgered.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
    finally:
        model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_models_at_a_quarter_of_the_flops(arch):
    transformers = pytest.importorskip("transformers")
    if arch == "gpt2":  # Conv1D layers (weight stored transposed)
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=32)
        match, types = "h.*.**", ["Conv1D"]
        model_class = transformers.GPT2Model
    else:
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        match, types = "layers.*.**", ["Linear"]
        model_class = transformers.LlamaModel
    config.vocab_size = 100
    torch.manual_seed(0)
    model = model_class(config).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 8))}
    spec = factorize_spec({"param_ratio": 0.25}, match, types)
    surgered = surgery.apply(model, spec, x, registry=factorize_only_registry())
    report = speed.measure(model, surgered, (1, 8), **QUICK)
    replaced = [t.name for t in Plan.from_dict(get_manifest(surgered)["plan"]).replaced()]
    assert replaced and [t.name for t in report.targets] == replaced
    for ts in report.targets:
        fin = model.get_submodule(ts.name).weight.shape[0 if arch == "gpt2" else 1]
        assert [tm.input_shape for tm in ts.timings] == [(1, fin), (8, fin)]
        assert all(tm.original_s > 0 and tm.replacement_s > 0 for tm in ts.timings)
        assert ts.flop_ratio == pytest.approx(ts.plan_flop_ratio)
        assert ts.flop_ratio < 0.3
    assert any(ts.same_as for ts in report.targets)  # block 1 has block 0's shapes


def test_conv_layers_are_timed_on_the_recorded_input():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3)).eval()
    spec = factorize_spec({"param_ratio": 0.5}, types=("Conv2d",))
    registry = factorize_only_registry()
    surgered = surgery.apply(model, spec, torch.randn(2, 3, 12, 12), registry=registry)
    report = speed.measure(model, surgered, TOKENS, **QUICK)
    (first, second) = report.targets
    assert [(tm.tokens, tm.input_shape) for tm in first.timings] == [(None, (2, 3, 12, 12))]
    assert second.timings[0].input_shape == (2, 16, 12, 12)
    assert report.totals() == []  # no token count to sum at
    blind = speed.measure(model, surgery.apply(model, spec, registry=registry), (1,), **QUICK)
    assert not any(ts.timed for ts in blind.targets)
    assert all("no input shape was recorded" in ts.reason for ts in blind.targets)


def test_a_chain_of_rules_is_timed_as_one_replacement():
    model = mlp()
    spec = factorize_spec({"param_ratio": 0.25})
    spec["rules"].append({"match": "0", "transform": "qat", "params": {"bits": 8}})
    surgered = surgery.apply(model, spec, torch.randn(4, 256))
    report = speed.measure(model, surgered, (1,), **QUICK)
    first = report.targets[0]
    assert first.name == "0" and first.transforms == ["factorize", "qat"]
    assert first.replacement == "QATLayer" and first.timed
    assert len(report.targets) == 3


def test_a_model_surgered_in_place_is_not_timed_against_itself():
    model = mlp()
    spec = factorize_spec({"rank": 8})
    same = surgery.apply(model, spec, inplace=True, registry=factorize_only_registry())
    report = speed.measure(model, same, (1,), **QUICK)
    assert report.targets and not any(ts.timed for ts in report.targets)
    assert all("surgered in place" in ts.reason for ts in report.targets)


def test_a_model_without_a_plan_is_refused():
    model = mlp()
    with pytest.raises(UserInputError, match="carries no plan"):
        speed.measure(model, mlp(), (1,))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,16,512,4096", [1, 16, 512, 4096]), (" 8 , 8,2", [8, 2]), ("1000000", [1_000_000])],
)
def test_parse_tokens(text, expected):
    assert speed.parse_tokens(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [("1,x", "'x'"), ("0", "0"), ("-4", "'-4'"), ("1.5", "'1.5'"), ("2000000", "2000000")],
)
def test_bad_token_counts_are_named(text, named):
    with pytest.raises(UserInputError, match=f"--tokens: {named} "):
        speed.parse_tokens(text)


def test_check_tokens_refuses_non_integers_and_nothing():
    with pytest.raises(UserInputError, match="out of range"):
        speed.check_tokens([1, 2.0])
    with pytest.raises(UserInputError, match="no token count"):
        speed.check_tokens([])


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_cuda_is_refused_where_there_is_none():
    with pytest.raises(UserInputError, match="CUDA is not available on this machine"):
        speed.resolve_device("cuda")


def test_unknown_devices_are_refused():
    with pytest.raises(UserInputError, match="cpu or cuda"):
        speed.resolve_device("meta")
    with pytest.raises(UserInputError, match="cpu or cuda"):
        speed.resolve_device("nonsense")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_timed_on_cuda(mlp_pair):
    model, surgered = mlp_pair
    report = speed.measure(model, surgered, (1, 16, 512, 4096), device="cuda", **QUICK)
    assert report.device.startswith("cuda") and report.device_name
    assert all(tm.original_s > 0 for ts in report.targets for tm in ts.timings)
    assert next(model.parameters()).device.type == "cpu"  # copies were moved, not the model


# --- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    where = tmp_path_factory.mktemp("bench")
    torch.save(mlp(), where / "mlp.pt")
    (where / "spec.json").write_text(json.dumps(factorize_spec({"param_ratio": 0.25})))
    return where


def bench(files, *args):
    args = [str(files / "spec.json"), str(files / "mlp.pt"), "--sample-input", "4x256", *args]
    return CliRunner().invoke(cli, ["bench", *args])


def test_bench_json(files):
    result = bench(files, "--tokens", "1,16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == [1, 16] and data["device"] == "cpu"
    assert [t["name"] for t in data["targets"]] == ["0", "2", "4"]
    for t in data["targets"]:
        assert [tm["tokens"] for tm in t["timings"]] == [1, 16]
        for tm in t["timings"]:
            assert tm["ratio"] == pytest.approx(tm["replacement_s"] / tm["original_s"])


def test_bench_table(files):
    result = bench(files, "--tokens", "1,16")
    assert result.exit_code == 0, result.output
    assert "1 tok" in result.stdout and "16 tok" in result.stdout
    assert "FLOP ratio" in result.stdout and "total: 3 target(s)" in result.stdout
    assert "1 token(s):" in result.stdout and "16 token(s):" in result.stdout
    slower = "slower at" in result.stdout
    assert slower == ("rank_multiple" in result.stdout)  # the hint comes with the names


@pytest.mark.parametrize("value", ["0", "1,abc", "1000001", ""])
def test_bench_bad_tokens_exit_2(files, value):
    result = bench(files, "--tokens", value)
    assert result.exit_code == 2
    assert "--tokens" in result.stderr and "Traceback" not in result.output


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_bench_cuda_refused_exit_2(files):
    result = bench(files, "--device", "cuda")
    assert result.exit_code == 2
    assert "CUDA is not available on this machine" in result.stderr


def test_a_training_section_is_not_run(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("bench trained the model")

    monkeypatch.setattr(surgery, "train", no_training)
    spec = factorize_spec({"param_ratio": 0.25})
    spec["training"] = {"data": {"source": "random", "shape": [4, 256]}, "steps": 5}
    spec = load_spec(spec)
    assert spec.training is not None
    report = build_and_time(spec, mlp(), torch.randn(4, 256), [1], quiet=True)
    assert [t.name for t in report.targets] == ["0", "2", "4"]


def test_plan_with_tokens_names_the_targets_that_would_be_slower(files):
    """``plan --tokens``: the plan, plus each replacement timed at those token counts
    (the speed report in its JSON); a bad count exits 2 before any work."""
    args = [str(files / "spec.json"), str(files / "mlp.pt"), "--sample-input", "4x256"]
    result = CliRunner().invoke(cli, ["plan", *args, "--tokens", "1,64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [t["name"] for t in data["targets"]] == ["0", "2", "4"]
    assert data["speed"]["tokens"] == [1, 64]
    assert {t["name"] for t in data["speed"]["targets"]} == {"0", "2", "4"}
    table = CliRunner().invoke(cli, ["plan", *args, "--tokens", "1"])
    assert table.exit_code == 0 and "1 tok" in table.stdout and "FLOP ratio" in table.stdout
    bad = CliRunner().invoke(cli, ["plan", *args, "--tokens", "0"])
    assert bad.exit_code == 2 and "--tokens" in bad.stderr
