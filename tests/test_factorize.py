"""Rank options and the ``factorize`` transform, checked against an exact SVD.

References are computed here, independently of tnsurgery: ``torch.linalg.svd`` in
float64 gives the singular values, Eckart–Young gives the best error at each rank,
and a dense ``F.linear`` / ``F.conv2d`` gives the outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    factorize_only_registry,
    known_rank,
    linear_with_weight,
    small_mlp,
    trained_like,
)
from torch import nn

from tnsurgery import surgery
from tnsurgery.decompositions.svd import gram_svd
from tnsurgery.errors import SpecError
from tnsurgery.layers import LowRankConv2d, LowRankLinear
from tnsurgery.spec import load_spec
from tnsurgery.surgery import get_manifest
from tnsurgery.transform import Context, RankOptions, resolve_rank, truncation_error
from tnsurgery.transforms import factorize
from tnsurgery.transforms.factorize import FactorizeParams

# --- independent references --------------------------------------------------------------


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Exact singular values, float64, decreasing."""
    return torch.linalg.svdvals(w.detach().reshape(w.shape[0], -1).double())


def optimal_error(w: torch.Tensor, rank: int) -> float:
    """Eckart–Young: relative Frobenius error of the best rank-``rank`` approximation."""
    s = singular_values(w)
    return math.sqrt(float(s[rank:].square().sum()) / float(s.square().sum()))


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def best_approximation(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` truncated SVD of ``w`` (as a matrix), float64."""
    u, s, vh = torch.linalg.svd(w.detach().reshape(w.shape[0], -1).double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def spec_for(params: dict, match: str = "**") -> dict:
    return {"version": 1, "rules": [{"match": match, "transform": "factorize", "params": params}]}


def apply(model: nn.Module, params: dict, sample=None, match: str = "**") -> nn.Module:
    return surgery.apply(model, spec_for(params, match), sample, registry=factorize_only_registry())


def plan(model: nn.Module, params: dict, sample=None, match: str = "**"):
    return surgery.plan(model, spec_for(params, match), sample, registry=factorize_only_registry())


def applied_targets(model: nn.Module) -> dict[str, dict]:
    """The per-target plan recorded in the manifest after apply, by name."""
    return {t["name"]: t for t in get_manifest(model)["plan"]["targets"]}


# --- rank options ------------------------------------------------------------------------

SQ = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # energy 0.4, 0.7, 0.9, 1.0


def resolve(sq=SQ, full=4, per_rank=10, dense=24, bias=0, **option) -> int:
    return resolve_rank(RankOptions(**option), full, per_rank, dense, sq, fixed_params=bias)


def test_rank_options_exactly_one():
    assert RankOptions(energy=0.9).describe() == {"energy": 0.9}
    assert RankOptions(energy=0.9).needs_spectrum
    assert RankOptions(max_error=0.1).needs_spectrum
    assert not RankOptions(rank=3).needs_spectrum
    assert not RankOptions(param_ratio=0.5).needs_spectrum
    with pytest.raises(ValueError, match="give exactly one of"):
        RankOptions()
    with pytest.raises(ValueError, match=r"got rank, rank_ratio"):
        RankOptions(rank=3, rank_ratio=0.5)


@pytest.mark.parametrize(
    "energy, rank",
    [(1e-6, 1), (0.4, 1), (0.4000001, 2), (0.7, 2), (0.7000001, 3), (0.9, 3), (0.95, 4), (1, 4)],
)
def test_energy_boundaries(energy, rank):
    # kept fractions are exactly 0.4, 0.7, 0.9, 1.0: a boundary value is met, not exceeded
    assert resolve(energy=energy) == rank


@pytest.mark.parametrize(
    "max_error, rank",
    [
        (0.999, 1),
        (math.sqrt(0.6), 1),
        (math.sqrt(0.6) - 1e-6, 2),
        (math.sqrt(0.3), 2),
        (math.sqrt(0.3) - 1e-6, 3),
        (math.sqrt(0.1), 3),
        (math.sqrt(0.1) - 1e-6, 4),
        (0, 4),
    ],
)
def test_max_error_boundaries(max_error, rank):
    # errors after keeping 1, 2, 3, 4 values: sqrt(.6), sqrt(.3), sqrt(.1), 0
    assert resolve(max_error=max_error) == rank


def test_spectrum_options_need_the_singular_values():
    with pytest.raises(ValueError, match="singular values"):
        resolve_rank(RankOptions(energy=0.9), 4, 10, 24)


def test_zero_matrix_resolves_to_rank_one():
    assert resolve(sq=torch.zeros(4, dtype=torch.float64), energy=0.9) == 1
    assert resolve(sq=torch.zeros(4, dtype=torch.float64), max_error=0.0) == 1


@pytest.mark.parametrize(
    "option, rank",
    [
        ({"rank": 100}, 4),
        ({"rank": 1}, 1),
        ({"rank_ratio": 0.01}, 1),
        ({"rank_ratio": 1}, 4),
        ({"param_ratio": 1e-4}, 1),
        ({"param_ratio": 1}, 2),  # floor(24 / 10)
    ],
)
def test_rank_is_clamped_to_one_and_full(option, rank):
    assert resolve(**option) == rank


@pytest.mark.parametrize("shape", [(64, 48), (40, 96)])
@pytest.mark.parametrize(
    "option",
    [
        {"rank": 7},
        {"rank_ratio": 0.3},
        {"rank_ratio": 0.71},
        {"param_ratio": 0.25},
        {"param_ratio": 0.6},
        {"energy": 0.5},
        {"energy": 0.9},
        {"energy": 0.999},
        {"max_error": 0.5},
        {"max_error": 0.2},
        {"max_error": 0.01},
    ],
)
def test_each_rank_option_matches_an_exact_svd(shape, option):
    m, n = shape
    w = trained_like(m, n, seed=3)
    full = min(m, n)
    s2 = singular_values(w).square()
    total = float(s2.sum())
    kept = [float(s2[:r].sum()) / total for r in range(full + 1)]
    (name, value), bias = next(iter(option.items())), m
    if name == "rank":
        expected = value
    elif name == "rank_ratio":
        expected = round(value * full)
    elif name == "param_ratio":
        # largest rank whose factors plus the kept bias fit in the budget
        budget = value * (m * n + bias)
        expected = max(r for r in range(1, full + 1) if r * (m + n) + bias <= budget)
    elif name == "energy":
        expected = min(r for r in range(1, full + 1) if kept[r] >= value)
    else:
        expected = min(r for r in range(1, full + 1) if math.sqrt(1 - kept[r]) <= value)
    lin = linear_with_weight(w)
    decision = factorize.plan(lin, FactorizeParams(**option), Context("fc"))
    assert decision.resolved["rank"] == expected
    assert decision.resolved[name] == value
    if decision.skip_reason is not None:  # e.g. energy 0.999 needs (nearly) full rank
        assert "would not shrink" in decision.skip_reason
        assert expected * (m + n) >= m * n
    elif name == "max_error":
        assert decision.predicted_error <= value
    elif name == "energy":
        assert 1 - decision.predicted_error**2 >= value - 1e-6


def test_truncation_error_is_eckart_young():
    w = trained_like(30, 20, seed=1)
    s2 = singular_values(w).square()
    total = float(w.double().square().sum())
    for r in (1, 5, 19, 20):
        # ||W||² and Σs² agree to float64 rounding, which the square root turns into ~1e-8
        assert truncation_error(s2, r, total) == pytest.approx(optimal_error(w, r), abs=1e-7)
    # with only the leading values (randomized SVD) the total carries the tail
    assert truncation_error(s2[:8], 5, total) == pytest.approx(optimal_error(w, 5), abs=1e-12)
    assert truncation_error(s2, 3, float(s2.sum())) == pytest.approx(optimal_error(w, 3), abs=1e-12)
    assert truncation_error(s2, 3, 0.0) == 0.0


# --- factorize: errors against Eckart–Young ----------------------------------------------


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_rank_is_reconstructed(method, dtype):
    lin = linear_with_weight(known_rank(60, 40, 5, seed=2, dtype=dtype))
    params = FactorizeParams(rank=5, method=method)
    decision = factorize.plan(lin, params, Context("fc"))
    new = factorize.build(lin, params, Context("fc", decision=decision))
    assert isinstance(new, LowRankLinear)
    assert (new.rank, new.in_features, new.out_features) == (5, 40, 60)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_error(new.to_dense(), lin.weight) < tol
    torch.testing.assert_close(new.bias, lin.bias, rtol=0, atol=0)
    x = torch.randn(3, 40, dtype=dtype)
    torch.testing.assert_close(new(x), lin(x), rtol=tol, atol=tol)


def test_bug_predicted_error_of_exact_low_rank_weight_is_zero():
    # float32, exact SVD: the predicted error mixes ||W||² (from W) with Σs² (from the SVD),
    # whose 1e-7 relative disagreement becomes a ~1e-4 error floor after the square root.
    lin = linear_with_weight(known_rank(60, 40, 5, seed=2))
    decision = factorize.plan(lin, FactorizeParams(rank=5, method="exact"), Context("fc"))
    assert decision.predicted_error < 1e-5


@pytest.mark.parametrize("method", ["exact", "gram"])
@pytest.mark.parametrize("rank", [1, 4, 12, 20])
def test_exact_methods_reach_the_eckart_young_optimum(rank, method):
    w = trained_like(64, 48, seed=5)
    model = nn.Sequential(linear_with_weight(w))
    out = apply(model, {"rank": rank, "method": method})
    layer = out[0]
    assert isinstance(layer, LowRankLinear) and layer.rank == rank
    measured = rel_error(layer.to_dense(), w)
    assert measured == pytest.approx(optimal_error(w, rank), abs=1e-5)
    # it is the truncated SVD itself, not just as good as it
    assert rel_error(layer.to_dense(), best_approximation(w, rank)) < 1e-5
    target = applied_targets(out)["0"]
    assert target["weight_error"] == pytest.approx(measured, abs=1e-9)
    assert target["predicted_error"] == pytest.approx(measured, abs=1e-5)


@pytest.mark.parametrize("rank", [2, 6, 10])
def test_randomized_method_is_near_optimal(rank):
    w = trained_like(96, 80, seed=6, decay=0.9)
    out = apply(nn.Sequential(linear_with_weight(w)), {"rank": rank, "method": "randomized"})
    target = applied_targets(out)["0"]
    assert target["resolved"]["method"] == "randomized"
    measured = rel_error(out[0].to_dense(), w)
    optimum = optimal_error(w, rank)
    assert optimum <= measured + 1e-6
    assert measured <= 1.03 * optimum


def test_factors_share_the_singular_values_evenly():
    w = trained_like(40, 30, seed=4)
    out = apply(nn.Sequential(linear_with_weight(w)), {"rank": 6, "method": "exact"})
    u, v = out[0].u.detach().double(), out[0].v.detach().double()
    s = singular_values(w)[:6]
    # u = U√S, v = √S Vᵀ: column norms of u and row norms of v are both √s
    torch.testing.assert_close(u.norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.norm(dim=1), s.sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        {"rank": 5, "method": "exact"},
        {"rank": 5, "method": "randomized"},
        {"rank": 5, "method": "gram"},
        {"energy": 0.9, "method": "gram"},
        {"rank": 5},
        {"energy": 0.9},
        {"max_error": 0.3},
        {"param_ratio": 0.4},
    ],
)
def test_predicted_error_equals_measured_error(params):
    model = small_mlp(seed=7)
    planned = {t.name: t for t in plan(model, params).targets}
    out = apply(model, params)
    applied = applied_targets(out)
    assert set(planned) == set(applied) == {"0", "2"}
    for name, target in applied.items():
        assert target["status"] == "replace"
        assert target["resolved"] == planned[name].resolved
        assert target["predicted_error"] == pytest.approx(planned[name].predicted_error, abs=1e-6)
        weight = model.get_submodule(name).weight
        measured = rel_error(out.get_submodule(name).to_dense(), weight)
        assert target["weight_error"] == pytest.approx(measured, abs=1e-9)
        assert target["predicted_error"] == pytest.approx(measured, abs=2e-5)


def test_float64_prediction_is_exact():
    model = small_mlp(seed=8, dtype=torch.float64)
    for method in ("exact", "gram", "randomized"):
        for target in applied_targets(apply(model, {"rank": 3, "method": method})).values():
            assert target["predicted_error"] == pytest.approx(target["weight_error"], abs=1e-10)


# --- method choice and determinism -------------------------------------------------------


def auto_boundary(full: int, oversample: int = 16, niter: int = 4) -> int:
    """Largest rank for which 'auto' picks the randomized SVD: its sketch times its
    passes over the weight must not exceed the full rank (else 'gram' is cheaper)."""
    return math.floor(full / (niter + 1)) - oversample


def resolved_method(lin: nn.Linear, **params) -> str:
    return factorize.plan(lin, FactorizeParams(**params), Context("fc")).resolved["method"]


def test_auto_picks_randomized_for_small_ranks_and_gram_otherwise():
    lin = linear_with_weight(trained_like(300, 200, seed=9))  # full rank 200
    edge = auto_boundary(200)
    assert edge >= 1
    assert resolved_method(lin, rank=1) == "randomized"
    assert resolved_method(lin, rank=edge) == "randomized"
    assert resolved_method(lin, rank=edge + 1) == "gram"
    assert resolved_method(lin, rank=edge + 4, oversample=0) == "randomized"
    # the rank of energy/max_error depends on the whole spectrum
    assert resolved_method(lin, energy=0.5) == "gram"
    assert resolved_method(lin, max_error=0.5) == "gram"
    assert resolved_method(lin, max_error=0.5, method="randomized") == "gram"


def test_method_param_forces_the_method():
    lin = linear_with_weight(trained_like(200, 120, seed=9))
    assert resolved_method(lin, rank=2, method="exact") == "exact"
    assert resolved_method(lin, rank=50, method="randomized") == "randomized"


def factors(out: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in out.parameters()]


@pytest.mark.parametrize("method", ["randomized", "gram", "exact"])
def test_same_seed_gives_bitwise_identical_factors(method):
    model = small_mlp(seed=10)
    a = factors(apply(model, {"rank": 3, "method": method, "seed": 123}))
    torch.manual_seed(999)  # the global RNG must not matter
    torch.randn(100)
    b = factors(apply(model, {"rank": 3, "method": method, "seed": 123}))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_different_seeds_give_different_but_equally_good_factors():
    w = trained_like(96, 80, seed=11)
    model = nn.Sequential(linear_with_weight(w))
    one = apply(model, {"rank": 4, "method": "randomized", "seed": 1, "niter": 0})
    two = apply(model, {"rank": 4, "method": "randomized", "seed": 2, "niter": 0})
    assert not torch.equal(one[0].u, two[0].u)
    optimum = optimal_error(w, 4)
    for out in (one, two):
        assert rel_error(out[0].to_dense(), w) <= 1.03 * optimum


def test_svd_leaves_the_global_rng_alone():
    w = trained_like(64, 48, seed=12)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    factorize.svd(w, 3, FactorizeParams(rank=3, method="randomized"))
    assert torch.equal(torch.get_rng_state(), state)


def test_bug_apply_leaves_the_global_rng_alone():
    # the SVD is seeded on its own generator, but LowRankLinear.from_factors first runs
    # reset_parameters() (nn.init.normal_), drawing from the global RNG for nothing
    model = small_mlp(seed=12)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    apply(model, {"rank": 3, "method": "randomized"})
    assert torch.equal(torch.get_rng_state(), state)


# --- Conv2d ------------------------------------------------------------------------------

CONV_CASES = {
    "plain": dict(in_channels=6, out_channels=10, kernel_size=3),
    "stride-pad-dilation": dict(
        in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=2, dilation=2
    ),
    "rect-no-bias": dict(
        in_channels=4,
        out_channels=12,
        kernel_size=(3, 5),
        stride=(1, 2),
        padding=(1, 0),
        bias=False,
    ),
    "same-reflect": dict(
        in_channels=5, out_channels=8, kernel_size=3, padding="same", padding_mode="reflect"
    ),
}


def make_conv(seed: int = 0, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(**kwargs)
    w = trained_like(conv.out_channels, conv.weight[0].numel(), seed=seed, decay=0.7)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(w.reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.out_channels, generator=gen))
    return conv.eval()


def dense_conv(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv`` applied with another weight (padding modes included)."""
    return conv._conv_forward(x, weight, conv.bias)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_output_equals_dense_conv_of_its_weight(case):
    conv = make_conv(seed=1, **CONV_CASES[case])
    x = torch.randn(2, conv.in_channels, 11, 13)
    params = FactorizeParams(rank=3, method="exact")
    new = factorize.build(conv, params, Context("conv"))
    assert isinstance(new, LowRankConv2d)
    y = new(x)
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, dense_conv(conv, new.to_dense(), x), rtol=1e-4, atol=1e-5)
    # and that weight is the optimal rank-3 approximation of the kernel
    assert new.to_dense().shape == conv.weight.shape
    assert rel_error(new.to_dense(), conv.weight) == pytest.approx(
        optimal_error(conv.weight, 3), abs=1e-5
    )


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_at_full_rank_matches_the_original(case):
    conv = make_conv(seed=2, **CONV_CASES[case])
    w = conv.weight.detach().reshape(conv.out_channels, -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    full = s.numel()
    root = s.sqrt()
    new = LowRankConv2d.from_factors(conv, (u * root).float(), (root[:, None] * vh).float())
    assert new.rank == full
    x = torch.randn(2, conv.in_channels, 9, 12)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-4, atol=1e-5)


def test_conv_through_apply_with_sample_input():
    model = nn.Sequential(make_conv(seed=3, **CONV_CASES["stride-pad-dilation"]), nn.ReLU())
    x = torch.randn(2, 6, 16, 16)
    out = apply(model, {"rank": 4}, x)
    layer = out[0]
    assert isinstance(layer, LowRankConv2d) and layer.rank == 4
    target = applied_targets(out)["0"]
    assert tuple(target["input_shape"]) == (2, 6, 16, 16)
    assert target["params_after"] == layer.param_count() == 4 * (6 * 9 + 10) + 10
    assert target["flops_after"] == layer.flops((2, 6, 16, 16))
    assert target["weight_error"] == pytest.approx(optimal_error(model[0].weight, 4), abs=1e-5)
    assert target["predicted_error"] == pytest.approx(target["weight_error"], abs=1e-5)


def test_grouped_conv_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    result = plan(model, {"rank": 1})
    grouped, plain = result.targets
    assert grouped.status == "skip"
    assert "groups=2" in grouped.reason and "groups=1" in grouped.reason
    assert plain.status == "replace"
    out = apply(model, {"rank": 1})
    assert type(out[0]) is nn.Conv2d
    torch.testing.assert_close(out[0].weight, model[0].weight, rtol=0, atol=0)
    assert isinstance(out[1], LowRankConv2d)
    assert get_manifest(out)["not_replaced"] == [
        {"name": "0", "rule_index": 0, "status": "skip", "reason": grouped.reason}
    ]


def test_bug_build_on_a_grouped_conv_raises_a_clear_error():
    # plan() skips it; build() called directly fails with a bare KeyError('rank')
    conv = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(Exception, match="groups"):
        factorize.build(conv, FactorizeParams(rank=1), Context("conv"))


# --- skips, dtypes, plan leaves the model alone -------------------------------------------


def test_layer_that_would_not_shrink_is_skipped_and_untouched():
    model = nn.Sequential(
        linear_with_weight(trained_like(16, 12, seed=1)),
        linear_with_weight(trained_like(8, 16, seed=2)),
    )
    # rank 6 of 16x12 needs 6 * 28 = 168 < 192 weights; of 8x16, 6 * 24 = 144 >= 128
    result = plan(model, {"rank": 6})
    first, second = result.targets
    assert first.status == "replace" and first.reason is None
    assert second.status == "skip"
    assert "would not shrink" in second.reason
    assert second.reason == "would not shrink: rank 6 needs 144 weight params, dense has 128"
    out = apply(model, {"rank": 6})
    assert isinstance(out[0], LowRankLinear)
    assert type(out[1]) is nn.Linear
    for name, p in model[1].named_parameters():
        torch.testing.assert_close(getattr(out[1], name), p, rtol=0, atol=0)
    assert [n["name"] for n in get_manifest(out)["not_replaced"]] == ["1"]


def test_rank_above_full_is_skipped_and_reports_the_clamped_rank():
    model = nn.Sequential(linear_with_weight(trained_like(16, 12, seed=1)))
    (target,) = plan(model, {"rank": 50}).targets
    assert target.status == "skip"
    assert "would not shrink: rank 12 " in target.reason


def test_bug_resolved_rank_is_the_clamped_rank():
    # the user's {"rank": 50} overwrites the resolved (clamped) rank 12 in the plan
    model = nn.Sequential(linear_with_weight(trained_like(16, 12, seed=1)))
    (target,) = plan(model, {"rank": 50}).targets
    assert target.resolved["rank"] == 12


def test_plan_does_not_touch_the_model():
    model = small_mlp(seed=13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    result = plan(model, {"rank": 4}, torch.randn(2, 48))
    assert [t.status for t in result.targets] == ["replace", "replace"]
    assert list(model.modules()) == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert get_manifest(model) is None


def test_plan_sizes_match_the_built_layers():
    model = small_mlp(seed=14)
    x = torch.randn(5, 3, 48)
    result = plan(model, {"rank": 4}, x)
    out = apply(model, {"rank": 4}, x)
    for t in result.targets:
        layer = out.get_submodule(t.name)
        dense = model.get_submodule(t.name)
        assert t.params_before == dense.weight.numel() + dense.bias.numel()
        assert t.params_after == layer.param_count()
        assert (
            t.flops_after
            == layer.flops(t.input_shape)
            == 2 * 15 * 4 * (dense.in_features + dense.out_features)
        )
        assert t.flops_before == 2 * 15 * dense.in_features * dense.out_features
    totals = result.totals()
    assert totals["model_params_after"] == sum(p.numel() for p in out.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    model = small_mlp(seed=15, dtype=dtype)
    x = torch.randn(4, 48, dtype=dtype)
    out = apply(model, {"rank": 8}, x)
    assert isinstance(out[0], LowRankLinear) and isinstance(out[2], LowRankLinear)
    assert {p.dtype for p in out.parameters()} == {dtype}
    assert out(x).dtype == dtype
    # the factors are the rank-8 truncation, up to the dtype's rounding
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    for name in ("0", "2"):
        w = model.get_submodule(name).weight
        err = rel_error(out.get_submodule(name).to_dense(), w)
        assert err == pytest.approx(optimal_error(w, 8), abs=tol)


def test_apply_copies_by_default_and_inplace_modifies():
    model = small_mlp(seed=16)
    out = apply(model, {"rank": 4})
    assert out is not model and type(model[0]) is nn.Linear
    same = surgery.apply(
        model, spec_for({"rank": 4}), inplace=True, registry=factorize_only_registry()
    )
    assert same is model and isinstance(model[0], LowRankLinear)
    torch.testing.assert_close(model[0].to_dense(), out[0].to_dense(), rtol=0, atol=0)


# --- rank_multiple: ranks rounded to GEMM-friendly multiples ------------------------------


@pytest.mark.parametrize(
    ("rank", "multiple", "full", "expected"),
    [
        (37, 16, 256, 32),  # nearest multiple below
        (40, 16, 256, 48),  # a tie goes up
        (41, 16, 256, 48),
        (3, 16, 256, 16),  # at least one multiple
        (250, 64, 200, 200),  # never above the full rank
        (37, None, 256, 37),  # no multiple: the rank as it was
        (37, 1, 256, 37),
    ],
)
def test_align_rank_rounds_to_the_nearest_multiple(rank, multiple, full, expected):
    assert factorize.align_rank(rank, multiple, full) == expected


@pytest.mark.parametrize(("asked", "used"), [(37, 32), (40, 48)])
def test_rank_multiple_builds_the_truncation_at_the_rounded_rank(asked, used):
    w = trained_like(96, 128, seed=21, decay=0.97)
    model = nn.Sequential(linear_with_weight(w))
    params = {"rank": asked, "rank_multiple": 16}
    (target,) = plan(model, params).targets
    assert target.resolved["rank_asked"] == asked
    assert target.resolved["rank"] == used and target.resolved["rank_multiple"] == 16
    out = apply(model, params)
    assert out[0].rank == used
    # the error is the SVD truncation's at the rank used, not at the rank asked
    assert rel_error(out[0].to_dense(), w) == pytest.approx(optimal_error(w, used), abs=1e-5)
    assert target.params_after == used * (96 + 128) + 96


def test_rank_multiple_applies_to_every_rank_option_and_is_capped():
    w = trained_like(40, 48, seed=22)
    model = nn.Sequential(linear_with_weight(w))
    (ratio,) = plan(model, {"rank_ratio": 0.5, "rank_multiple": 8}).targets
    assert (ratio.resolved["rank_asked"], ratio.resolved["rank"]) == (20, 24)
    (capped,) = plan(model, {"rank": 30, "rank_multiple": 64}).targets
    assert capped.resolved["rank"] == 40  # min(out, in), although not a multiple of 64
    assert capped.status == "skip" and "rounded by rank_multiple 64" in capped.reason


@pytest.mark.parametrize("bad", [0, -16, 2.5, "16", True, 2048])
def test_rank_multiple_must_be_a_positive_int(bad):
    with pytest.raises(SpecError, match=r"params\.rank_multiple"):
        load_spec(spec_for({"rank": 8, "rank_multiple": bad}), factorize_only_registry())


def test_rank_multiple_survives_a_budget():
    model = nn.Sequential(*(linear_with_weight(trained_like(64, 64, seed=s)) for s in (1, 2)))
    spec = {
        "version": 1,
        "budget": {"params": 0.5},
        "rules": [{"match": "*", "transform": "factorize", "params": {"rank_multiple": 8}}],
    }
    p = surgery.plan(model, spec, registry=factorize_only_registry())
    ranks = [t.resolved["rank"] for t in p.replaced()]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert all("rank_asked" in t.resolved for t in p.replaced())


def test_gram_svd_of_a_stack_equals_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 20, 12), (3, 12, 20)):  # tall and wide
        stack = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, v = gram_svd(stack, 5)
        for i, a in enumerate(stack):
            ui, si, vi = gram_svd(a, 5)
            torch.testing.assert_close(s[i], si)
            # the same rank-5 approximation (singular vectors are defined up to sign)
            torch.testing.assert_close((u[i] * s[i]) @ v[i].mT, (ui * si) @ vi.mT)
