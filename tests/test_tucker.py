"""The ``tucker`` transform, its decompositions and its layers, against exact references.

References are computed here, independently of tnsurgery: tensors built with a known
multilinear rank, singular values of unfoldings from ``torch.linalg.svdvals`` in float64
(which bound any Tucker approximation from both sides), dense ``F.conv2d`` / ``F.linear``
for the outputs, and sizes counted by hand.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import linear_with_weight, trained_like
from pydantic import ValidationError
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.decompositions.tucker import (
    feasible_ranks,
    hooi,
    hosvd,
    hosvd_error_bound,
    tucker_to_full,
)
from tnsurgery.errors import SpecError
from tnsurgery.layers.tucker import TuckerConv2d, TuckerLinear
from tnsurgery.plugins import Registry
from tnsurgery.spec import load_spec
from tnsurgery.transform import Context
from tnsurgery.transforms import tucker
from tnsurgery.transforms.tucker import TuckerParams

# --- helpers and independent references ---------------------------------------------------


def registry() -> Registry:
    reg = Registry()
    tucker.register_transforms(register=lambda t: reg.transforms.__setitem__(t.name, t))
    reg.origins["tucker"] = "builtin"
    return reg


def spec_for(params: dict, match="**") -> dict:
    return {"version": 1, "rules": [{"match": match, "transform": "tucker", "params": params}]}


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def known_tucker(shape, ranks, seed=0) -> torch.Tensor:
    """A float64 tensor of exact multilinear rank ``ranks`` (``None``: a mode at full size)."""
    gen = torch.Generator().manual_seed(seed)
    core_shape = [n if r is None else r for n, r in zip(shape, ranks, strict=True)]
    t = torch.randn(*core_shape, generator=gen, dtype=torch.float64)
    for k, (n, r) in enumerate(zip(shape, ranks, strict=True)):
        if r is not None:
            t = torch.movedim(torch.tensordot(t, orthonormal(n, r, gen), dims=([k], [1])), -1, k)
    return t


def mode_tails(t: torch.Tensor, ranks) -> list[float]:
    """Per decomposed mode: the norm of the singular values of the unfolding beyond r_k."""
    tails = []
    for k, r in enumerate(ranks):
        if r is not None:
            s = torch.linalg.svdvals(t.double().movedim(k, 0).reshape(t.shape[k], -1))
            tails.append(float(s[r:].square().sum().sqrt()))
    return tails


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def conv_with(weight: torch.Tensor, bias=True, **kw) -> nn.Conv2d:
    o, i, kh, kw_ = weight.shape
    conv = nn.Conv2d(i, o, (kh, kw_), bias=bias, dtype=weight.dtype, **kw)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias:
            conv.bias.copy_(torch.linspace(-1, 1, o))
    return conv


def plan_one(module: nn.Module, input_shape=None, **params):
    return tucker.plan(module, TuckerParams(**params), Context("m", input_shape))


# --- decompositions ------------------------------------------------------------------------


def test_known_tucker2_kernel_is_recovered_to_float_tolerance():
    w = known_tucker((12, 10, 3, 3), (5, 4, None, None))
    for t in (w, w.float()):
        dec = hosvd(t, [5, 4, None, None])
        assert dec.ranks == [5, 4, 3, 3] and dec.factors[2:] == [None, None]
        tol = 1e-12 if t.dtype == torch.float64 else 1e-6
        assert rel_error(tucker_to_full(dec.core, dec.factors), w) < tol
        for u in dec.factors[:2]:  # orthonormal factors
            torch.testing.assert_close(u.mT @ u, torch.eye(u.shape[1], dtype=t.dtype))
        refined, _ = hooi(t, dec, 3)
        assert rel_error(tucker_to_full(refined.core, refined.factors), w) < tol


def test_known_tucker_linear_weight_is_recovered_through_the_transform():
    # W (out=20, in=24) as a (5, 4, 6, 4) tensor of multilinear rank (3, 2, 4, 2)
    w = known_tucker((5, 4, 6, 4), (3, 2, 4, 2), seed=1).reshape(20, 24).float()
    layer = linear_with_weight(w)
    d = plan_one(layer, ranks=[3, 2, 4, 2], out_factors=[5, 4], in_factors=[6, 4])
    assert d.skip_reason is None and d.resolved["ranks"] == [3, 2, 4, 2]
    assert d.predicted_error < 1e-6
    assert rel_error(d.state.to_dense(), w) == pytest.approx(d.predicted_error, abs=1e-12)


def test_max_error_finds_the_exact_multilinear_rank():
    w = known_tucker((16, 12, 3, 3), (6, 5, None, None), seed=2).float()
    d = plan_one(conv_with(w), max_error=1e-4)
    assert d.resolved["ranks"] == [6, 5]
    assert d.predicted_error < 1e-6


def test_hooi_never_worse_than_hosvd_and_both_within_the_truncation_bounds():
    shapes = [((12, 10, 3, 3), [4, 3, None, None]), ((5, 6, 4, 7), [2, 3, 2, 3])]
    for seed in range(3):
        for shape, ranks in shapes:
            t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            norm = float(t.double().norm())
            init = hosvd(t, ranks)
            refined, sweeps = hooi(t, init, 10)
            e0 = rel_error(tucker_to_full(init.core, init.factors), t)
            e1 = rel_error(tucker_to_full(refined.core, refined.factors), t)
            tails = mode_tails(t, ranks)
            upper = math.sqrt(sum(x * x for x in tails)) / norm  # HOSVD's guarantee
            lower = max(tails) / norm  # no Tucker approximation beats one mode's truncation
            assert lower - 1e-6 <= e1 <= e0 + 1e-7
            assert e0 <= upper + 1e-6
            assert hosvd_error_bound(init.spectra, init.ranks) == pytest.approx(upper, rel=1e-5)
            assert refined.ranks == init.ranks
            if sweeps:  # random tensors: HOSVD is not optimal, HOOI improves it strictly
                assert e1 < e0
    zero, n = hooi(t, init, 0)
    assert zero is init and n == 0


def test_feasible_ranks_lower_only_what_cannot_be_used():
    assert feasible_ranks((8, 8, 8), [4, 1, 1]) == [1, 1, 1]
    assert feasible_ranks((8, 8, 8), [4, 2, 2]) == [4, 2, 2]
    assert feasible_ranks((8, 8, 8), [9, 3, 2]) == [6, 3, 2]
    # a kept mode (None) is never lowered, and counts at full size
    assert feasible_ranks((9, 9, 1, 5), [9, 1, None, None]) == [5, 1, 1, 5]


def test_hosvd_lowers_unusable_ranks_without_loss():
    t = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dec = hosvd(t, [6, 1, 2])  # mode 0 cannot use more than 1·2 = 2 of its 6 vectors
    assert dec.ranks == [2, 1, 2]
    # reference: project every mode on the leading (6, 1, 2) left singular vectors
    ref = t
    for k, r in enumerate([6, 1, 2]):
        u = torch.linalg.svd(t.movedim(k, 0).reshape(t.shape[k], -1)).U[:, :r]
        ref = torch.movedim(torch.tensordot(ref, u @ u.T, dims=([k], [1])), -1, k)
    torch.testing.assert_close(tucker_to_full(dec.core, dec.factors), ref)


# --- rank options -------------------------------------------------------------------------

CONV_W = trained_like(24, 16 * 9, seed=3).reshape(24, 16, 3, 3)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"ranks": [8, 4]}, [8, 4]),
        ({"ranks": [0.5, 0.25]}, [12, 4]),  # fractions of 24 and 16
        ({"ranks": [1.0, 3]}, [24, 3]),
        ({"rank": 6}, [6, 6]),
        ({"rank": 18}, [18, 16]),  # clamped to the 16 input channels
        ({"rank_ratio": 0.5}, [12, 8]),
        ({"rank_ratio": 0.1}, [2, 2]),  # 2.4 -> 2, 1.6 -> 2
    ],
)
def test_conv_rank_options_resolve_as_documented(params, expected):
    d = plan_one(conv_with(CONV_W), **params)
    assert d.resolved["ranks"] == expected
    r_out, r_in = expected
    assert d.params_after == 16 * r_in + r_out * r_in * 9 + r_out * 24 + 24


def test_param_ratio_picks_the_largest_proportional_ranks_within_budget():
    conv = conv_with(CONV_W)
    dense, bias = 24 * 16 * 9, 24
    for ratio in (0.1, 0.25, 0.4):
        d = plan_one(conv, param_ratio=ratio)
        budget = ratio * (dense + bias)
        assert d.params_after <= budget
        best = None  # brute force over fractions: ranks floor(f·24), floor(f·16)
        for i in range(1, 10001):
            f = i / 10000
            r_out, r_in = max(1, math.floor(f * 24 + 1e-9)), max(1, math.floor(f * 16 + 1e-9))
            if 16 * r_in + r_out * r_in * 9 + r_out * 24 + bias <= budget:
                best = [r_out, r_in]
        assert d.resolved["ranks"] == best


def test_linear_ranks_per_side_per_mode_and_fractions():
    w = trained_like(24, 30, seed=4)
    lin = linear_with_weight(w)
    modes = {"out_factors": [6, 4], "in_factors": [6, 5]}
    assert plan_one(lin, ranks=[3, 2], **modes).resolved["ranks"] == [3, 3, 2, 2]
    assert plan_one(lin, ranks=[3, 2, 4, 1], **modes).resolved["ranks"] == [3, 2, 4, 1]
    assert plan_one(lin, ranks=[0.5, 0.5], **modes).resolved["ranks"] == [3, 2, 3, 3]
    d = plan_one(lin, rank=2, **modes)
    assert d.resolved["ranks"] == [2, 2, 2, 2]
    assert d.params_after == 16 + 6 * 2 + 4 * 2 + 6 * 2 + 5 * 2 + 24
    # default modes come from choose_factors, as for tt
    d = plan_one(lin, rank=2)
    assert d.resolved["out_factors"] == [6, 4] and d.resolved["in_factors"] == [6, 5]


def test_linear_param_ratio_fits_the_budget_bias_counted_on_both_sides():
    lin = linear_with_weight(trained_like(24, 30, seed=4))
    # below what ranks of 1 need, every rank stays 1 (as resolve_rank clamps to 1)
    assert plan_one(lin, param_ratio=0.05).resolved["ranks"] == [1, 1, 1, 1]
    for ratio in (0.1, 0.2, 0.5):
        d = plan_one(lin, param_ratio=ratio)
        assert d.params_after <= ratio * (24 * 30 + 24)
        bigger = [r + 1 for r in d.resolved["ranks"]]  # one more in every mode: over budget
        cap = [6, 4, 6, 5]
        bigger = [min(r, c) for r, c in zip(bigger, cap, strict=True)]
        over = math.prod(bigger) + sum(r * c for r, c in zip(bigger, cap, strict=True)) + 24
        assert over > ratio * (24 * 30 + 24) or bigger == d.resolved["ranks"]


def test_hooi_sweeps_in_the_transform_only_lower_the_error():
    conv = conv_with(CONV_W)
    errors = [plan_one(conv, ranks=[6, 4], hooi_iters=n).predicted_error for n in (0, 1, 5)]
    assert errors[2] <= errors[1] <= errors[0]
    assert errors[2] < errors[0]
    assert plan_one(conv, ranks=[6, 4], hooi_iters=0).resolved["hooi_iters"] == 0


def test_build_without_a_plan_plans_itself():
    conv = conv_with(CONV_W)
    layer = tucker.build(conv, TuckerParams(rank=4), Context("c"))
    planned = plan_one(conv, rank=4).state
    assert layer.config() == planned.config()
    torch.testing.assert_close(layer.to_dense(), planned.to_dense(), rtol=0, atol=0)


def test_max_error_and_energy_keep_the_fewest_values_meeting_the_split_bound():
    conv = conv_with(CONV_W)
    norm = float(CONV_W.double().norm())
    for params, eps in (({"max_error": 0.3}, 0.3), ({"energy": 0.91}, math.sqrt(1 - 0.91))):
        d = plan_one(conv, **params)
        assert d.predicted_error <= eps
        delta = eps * norm / math.sqrt(2)
        for k, r in enumerate(d.resolved["ranks"]):
            s = torch.linalg.svdvals(CONV_W.double().movedim(k, 0).reshape(CONV_W.shape[k], -1))
            tail = s.square().flip(0).cumsum(0).flip(0).sqrt()  # tail[i]: error keeping i
            tail = torch.cat([tail, tail.new_zeros(1)])
            assert float(tail[r]) <= delta * (1 + 1e-6)
            assert float(tail[r - 1]) > delta


@pytest.mark.parametrize(
    "params, message",
    [
        ({"ranks": [True, 2]}, "not booleans"),
        ({"ranks": [2, 3, 4]}, "ranks needs 2 values"),
        ({"ranks": [2.5, 3]}, "ranks.0"),
        ({"ranks": [0, 3]}, "greater than or equal to 1"),
        ({"rank": 2, "ranks": [2, 2]}, "give exactly one of"),
        ({"rank": 2, "hooi_iters": -1}, "hooi_iters"),
        ({"rank": 2, "in_factors": [2, 3], "out_factors": [4]}, "same length"),
    ],
)
def test_bad_params_are_rejected(params, message):
    with pytest.raises(ValidationError, match=message):
        TuckerParams(**params)


def test_spec_validation_through_a_registry():
    reg = registry()
    spec = load_spec(spec_for({"ranks": [4, 2], "hooi_iters": 0}), reg)
    assert spec.rules[0].parsed_params.hooi_iters == 0
    with pytest.raises(SpecError, match="hooi_iter"):
        load_spec(spec_for({"rank": 2, "hooi_iter": 1}), reg)


# --- planning and surgery -------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = conv_with(CONV_W.to(dtype), padding=1)
        self.fc = linear_with_weight(trained_like(20, 24 * 16, seed=5, dtype=dtype))

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)).repeat(1, 16))


def test_predicted_error_equals_the_error_measured_after_surgery():
    model = Net().eval()
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    out = surgery.apply(model, spec_for({"rank_ratio": 0.5}), x, registry=registry())
    reps = {r["name"]: r for r in tnsurgery.get_manifest(out)["replacements"]}
    assert set(reps) == {"conv", "fc"}
    assert isinstance(out.conv, TuckerConv2d) and isinstance(out.fc, TuckerLinear)
    for name, orig in (("conv", model.conv), ("fc", model.fc)):
        rep, new = reps[name], getattr(out, name)
        assert rep["predicted_error"] == rep["weight_error"]
        assert rep["predicted_error"] == pytest.approx(rel_error(new.to_dense(), orig.weight))
        assert rep["params_after"] == sum(p.numel() for p in new.parameters())
        assert 0 < rep["predicted_error"] < 1
    # the plan alone predicts the same as what apply did
    planned = {
        t.name: t
        for t in surgery.plan(model, spec_for({"rank_ratio": 0.5}), x, registry=registry()).targets
    }
    assert planned["conv"].predicted_error == reps["conv"]["predicted_error"]
    assert planned["conv"].flops_after == out.conv.flops((2, 16, 6, 6))


def test_skips_with_reasons():
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    assert "groups=2" in plan_one(grouped, rank=2).skip_reason
    d = plan_one(conv_with(CONV_W), ranks=[24, 16])  # full ranks: more params than dense
    assert d.skip_reason.startswith("would not shrink: Tucker ranks [24, 16]")
    assert d.resolved["ranks"] == [24, 16]
    lin = nn.Linear(30, 24)
    assert (
        "do not cover" in plan_one(lin, rank=2, in_factors=[5, 5], out_factors=[6, 4]).skip_reason
    )
    assert "Conv2d takes ranks" in plan_one(nn.Conv2d(4, 4, 3), ranks=[1, 1, 1, 1]).skip_reason
    with pytest.raises(ValueError, match="cannot apply tucker"):
        tucker.build(grouped, TuckerParams(rank=2), Context("g"))


def test_bfloat16_modules_keep_their_dtype_and_the_error_still_matches():
    model = Net(torch.bfloat16).eval()
    x = torch.randn(1, 16, 5, 5, dtype=torch.bfloat16)
    out = surgery.apply(model, spec_for({"rank_ratio": 0.5}), x, registry=registry())
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    assert out(x).dtype == torch.bfloat16
    for rep in tnsurgery.get_manifest(out)["replacements"]:
        assert rep["predicted_error"] == rep["weight_error"] < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_models_stay_on_cuda():
    model = Net().eval().cuda()
    x = torch.randn(2, 16, 6, 6, device="cuda")
    out = surgery.apply(model, spec_for({"rank_ratio": 0.5}), x, registry=registry())
    assert {p.device.type for p in out.parameters()} == {"cuda"}
    for rep in tnsurgery.get_manifest(out)["replacements"]:
        assert rep["predicted_error"] == pytest.approx(rep["weight_error"], rel=1e-6)


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = Net().eval()
    x = torch.randn(2, 16, 6, 6)
    out = surgery.apply(model, spec_for({"rank": 4}), x, registry=registry())
    tnsurgery.save(out, tmp_path / "m")
    loaded = tnsurgery.load(tmp_path / "m", Net(), registry=registry()).eval()
    assert isinstance(loaded.conv, TuckerConv2d) and isinstance(loaded.fc, TuckerLinear)
    torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)


# --- layers ----------------------------------------------------------------------------------


def seeded_conv(bias=True, **kw) -> TuckerConv2d:
    torch.manual_seed(0)
    layer = TuckerConv2d(4, 6, (3, 3), (3, 2), bias=bias, **kw)
    if bias:
        with torch.no_grad():
            layer.last.bias.normal_()
    return layer


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"bias": False},
        {"stride": (2, 2), "padding": (1, 1)},
        {"padding": (2, 1), "dilation": (2, 2)},
        {"padding": "same"},
        {"padding": (1, 1), "padding_mode": "reflect"},
        {"padding": (1, 1), "padding_mode": "circular", "stride": (2, 1)},
    ],
)
def test_tucker_conv_equals_the_dense_conv(kw):
    layer = seeded_conv(**kw)
    dense = nn.Conv2d(4, 6, 3, **{"bias": True, **kw})
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        if dense.bias is not None:
            dense.bias.copy_(layer.last.bias)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def seeded_linear(path="auto") -> TuckerLinear:
    torch.manual_seed(0)
    layer = TuckerLinear(10, 7, [4, 3], [4, 2], [2, 2, 3, 2], path=path)  # padded: 12 -> 10, 8 -> 7
    with torch.no_grad():
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("path", ["contract", "dense", "auto"])
def test_tucker_linear_equals_x_wt_plus_b(path):
    layer = seeded_linear(path)
    x = torch.randn(3, 5, 10)
    w = layer.to_dense()
    assert w.shape == (7, 10)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # cached dense weight in inference
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_to_dense_is_the_tucker_tensor_cropped():
    layer = seeded_linear()
    full = torch.einsum(
        "abcd,ia,jb,kc,ld->ijkl", layer.core, *layer.out_proj, *layer.in_proj
    ).reshape(8, 12)
    torch.testing.assert_close(layer.to_dense(), full[:7, :10])


def test_gradients_flow_and_match_the_dense_layer():
    for layer, x in (
        (seeded_linear("contract"), torch.randn(4, 10)),
        (seeded_conv(), torch.randn(1, 4, 6, 6)),
    ):
        x.requires_grad_(True)
        layer(x).square().sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        # the input gradient equals the dense layer's
        x2 = x.detach().clone().requires_grad_(True)
        w = layer.to_dense().detach()
        if isinstance(layer, TuckerLinear):
            y = F.linear(x2, w, layer.bias.detach())
        else:
            y = F.conv2d(x2, w, layer.last.bias.detach())
        y.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_sizes_against_hand_counts():
    conv = TuckerConv2d(16, 32, (3, 3), (8, 4), padding=(1, 1))
    assert conv.param_count() == 16 * 4 + 8 * 4 * 9 + 8 * 32 + 32 == 640
    # first 1×1 at 10×10: 16·4 per pixel; core and last at the output's 10×10 (5×5 strided)
    assert conv.flops((2, 16, 10, 10)) == 2 * 2 * (16 * 4 * 100 + (4 * 8 * 9 + 8 * 32) * 100)
    strided = TuckerConv2d(16, 32, (3, 3), (8, 4), stride=(2, 2), padding=(1, 1))
    assert strided.flops((2, 16, 10, 10)) == 2 * 2 * (16 * 4 * 100 + (4 * 8 * 9 + 8 * 32) * 25)
    assert strided.flops((16, 10, 10)) == strided.flops((1, 16, 10, 10))

    lin = TuckerLinear(12, 10, [4, 3], [5, 2], [2, 2, 3, 2])
    assert lin.param_count() == 2 * 2 * 3 * 2 + (5 * 2 + 2 * 2) + (4 * 3 + 3 * 2) + 10 == 66
    # per row: in modes 4·3·3 + 3·3·2, core 6·4, out modes 2·5·2 + 5·2·2
    per_row = 4 * 3 * 3 + 3 * 3 * 2 + 6 * 4 + 2 * 5 * 2 + 5 * 2 * 2
    assert lin.contraction_flops(7) == 2 * 7 * per_row == 1652
    assert lin.flops((7, 12)) == 1652  # cheaper than the dense 2·7·12·10 = 1680
    # rebuild: core (2,2,3,2) -> (5,2,3,2) -> same -> (5,2,4,2) -> (5,2,4,3)
    assert lin.rebuild_flops() == 2 * (24 * 5 + 60 * 2 + 60 * 4 + 80 * 3) == 1440
    assert TuckerLinear(12, 10, [4, 3], [5, 2], [2, 2, 3, 2], path="dense").flops((7, 12)) == 1680
    full = TuckerLinear(12, 10, [4, 3], [5, 2], [5, 2, 4, 3])
    assert full.choose_path(1000) == "dense" and full.flops((1000, 12)) == 2 * 1000 * 120


def test_config_roundtrip_and_repr():
    for layer, x in (
        (seeded_linear(), torch.randn(2, 10)),
        (seeded_conv(padding="same", padding_mode="reflect"), torch.randn(1, 4, 5, 5)),
    ):
        copy = type(layer).from_config(layer.config())
        copy.load_state_dict(layer.state_dict())
        assert copy.config() == layer.config()
        torch.testing.assert_close(copy(x), layer(x), rtol=0, atol=0)
    assert seeded_linear().config() == {
        "in_features": 10,
        "out_features": 7,
        "in_factors": [4, 3],
        "out_factors": [4, 2],
        "ranks": [2, 2, 3, 2],
        "bias": True,
        "path": "auto",
    }
    assert "ranks [r_out, r_in]=[3, 2]" in repr(seeded_conv())
    assert "4->2->3->6, kernel=3x3" in repr(seeded_conv())
    assert "weight params 80/216 (37.0%)" in repr(seeded_conv())  # 4·2 + 3·2·9 + 3·6
    text = repr(seeded_linear())
    assert "out modes=[4, 2] ranks=[2, 2]" in text and "in modes=[4, 3] ranks=[3, 2]" in text


def test_fresh_linear_has_a_dense_layers_scale():
    torch.manual_seed(0)
    layer = TuckerLinear(256, 256, [16, 16], [16, 16], [8, 8, 8, 8])
    with torch.no_grad():
        var = float(layer.to_dense().var())
    assert var == pytest.approx(1 / (3 * 256), rel=0.2)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++")
def test_torch_compile_on_cpu():
    torch._dynamo.reset()
    for layer, x in (
        (seeded_linear("contract"), torch.randn(3, 10)),
        (seeded_conv(padding=(1, 1)), torch.randn(1, 4, 6, 6)),
    ):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_runs_like_the_module():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    for layer, x in (
        (seeded_linear("contract"), torch.randn(3, 10)),
        (seeded_linear("dense"), torch.randn(3, 10)),
        (seeded_conv(stride=(2, 2), padding=(1, 1)), torch.randn(1, 4, 7, 7)),
    ):
        layer.eval()
        program = torch.onnx.export(layer, (x,), dynamo=True, verbose=False)
        model = program.model_proto
        onnx.checker.check_model(model)
        got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), layer(x).detach(), rtol=1e-5, atol=1e-5)
