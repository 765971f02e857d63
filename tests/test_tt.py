"""tt: TT-SVD against exact references, TTLinear's forward paths, the TT toolbox."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.decompositions.factors import balanced_factors, choose_factors
from tnsurgery.decompositions.tt import (
    matrix_to_tt_tensor,
    orthogonalize,
    split_cores,
    tt_matrix_full,
    tt_round,
    tt_svd,
)
from tnsurgery.errors import SpecError
from tnsurgery.layers.tt import ContractionPlan, TTLinear
from tnsurgery.spec import load_spec

OUT_F, IN_F = (4, 6, 5), (3, 4, 7)  # a 120 x 84 weight


def known_tt(ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = [1, *ranks, 1]
    cores = [
        torch.randn(r[k], OUT_F[k], IN_F[k], r[k + 1], generator=g, dtype=dtype) for k in range(3)
    ]
    return cores, tt_matrix_full(cores)


def linear_with(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def spec(params, match="*"):
    return {"rules": [{"match": match, "transform": "tt", "params": params}]}


# ----------------------------------------------------------- decompositions


def test_balanced_factors_and_padding():
    assert balanced_factors(768, 3) == (12, 8, 8)
    assert balanced_factors(4096, 3) == (16, 16, 16)
    assert choose_factors(768, 3) == ((12, 8, 8), 768)
    factors, padded = choose_factors(769, 3)  # 769 is prime: padded
    assert padded == math.prod(factors) and 769 < padded <= 769 * 1.25


def test_tt_svd_recovers_a_known_tt_rank_matrix_exactly():
    cores, w = known_tt([3, 4])
    c3, _ = tt_svd(matrix_to_tt_tensor(w, OUT_F, IN_F), rel_error=1e-12)
    assert [c.shape[-1] for c in c3[:-1]] == [3, 4]
    assert rel(tt_matrix_full(split_cores(c3, OUT_F, IN_F)), w) < 1e-12


def test_tt_svd_meets_max_error_and_first_bond_is_optimal():
    w = torch.randn(120, 84, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for eps in (0.1, 0.3, 0.6):
        c3, _ = tt_svd(matrix_to_tt_tensor(w, OUT_F, IN_F), rel_error=eps)
        assert rel(tt_matrix_full(split_cores(c3, OUT_F, IN_F)), w) <= eps + 1e-12
    # with d = 2 the TT-SVD is a truncated SVD of the (m1 n1, m2 n2) unfolding: Eckart-Young
    t = matrix_to_tt_tensor(w, (12, 10), (12, 7))
    c3, _ = tt_svd(t, max_ranks=[5])
    s = torch.linalg.svdvals(t)
    optimal = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    assert rel(tt_matrix_full(split_cores(c3, (12, 10), (12, 7))), w) == pytest.approx(optimal)


def test_orthogonalize_keeps_the_matrix_and_makes_cores_orthonormal():
    cores, w = known_tt([3, 4])
    left = orthogonalize(cores, "left")
    assert rel(tt_matrix_full(left), w) < 1e-12
    for c in left[:-1]:
        mat = c.reshape(-1, c.shape[-1])
        assert torch.allclose(mat.T @ mat, torch.eye(mat.shape[1], dtype=mat.dtype), atol=1e-10)
    right = orthogonalize(cores, "right")
    assert rel(tt_matrix_full(right), w) < 1e-12
    for c in right[1:]:
        mat = c.reshape(c.shape[0], -1)
        assert torch.allclose(mat @ mat.T, torch.eye(mat.shape[0], dtype=mat.dtype), atol=1e-10)


def test_tt_round_is_exact_at_true_ranks_and_matches_tt_svd_below():
    cores, w = known_tt([3, 4])
    padded = [
        torch.cat([c, torch.zeros_like(c)], dim=-1) if k < 2 else c for k, c in enumerate(cores)
    ]
    padded = [
        torch.cat([c, torch.zeros_like(c)], dim=0) if k > 0 else c for k, c in enumerate(padded)
    ]  # ranks doubled with zeros: same matrix
    assert rel(tt_matrix_full(padded), w) < 1e-12
    rounded = tt_round(padded, rel_error=1e-10)
    assert [c.shape[-1] for c in rounded[:-1]] == [3, 4]
    assert rel(tt_matrix_full(rounded), w) < 1e-10
    low = tt_round(cores, max_ranks=2)
    c3, _ = tt_svd(matrix_to_tt_tensor(w, OUT_F, IN_F), max_ranks=[2, 2])
    direct = rel(tt_matrix_full(split_cores(c3, OUT_F, IN_F)), w)
    assert rel(tt_matrix_full(low), w) == pytest.approx(direct, rel=0.05)


# ------------------------------------------------------------------ layer


@pytest.fixture
def layer():
    torch.manual_seed(0)
    # 100 -> 90 on padded modes (5,5,4) x (5,6,3): out 90 = 5*6*3, in 100 = 5*5*4
    return TTLinear(100, 90, (5, 5, 4), (5, 6, 3), [1, 4, 3, 1], dtype=torch.float64)


def test_every_forward_path_equals_the_dense_layer(layer):
    x = torch.randn(2, 7, 100, dtype=torch.float64)
    ref = x @ layer.to_dense().T + layer.bias
    for path in ("contract", "dense", "auto"):
        layer.path = path
        assert torch.allclose(layer(x), ref, atol=1e-12)
    # every grouping of the cores and every matmul layout of each step
    x2 = x.reshape(-1, 100)
    for cuts in ((1,), (2,), (1, 2)):
        steps = len(cuts) + 1
        for forms in itertools.product("AB", repeat=steps):
            plan = ContractionPlan(cuts, forms, 0.0, 0)
            y = layer._contract(x2, plan)[:, :90] + layer.bias
            assert torch.allclose(y, ref.reshape(-1, 90), atol=1e-12), (cuts, forms)


def test_padded_modes_crop_to_the_layer(layer):
    torch.manual_seed(1)
    small = TTLinear(97, 88, (5, 5, 4), (5, 6, 3), [1, 4, 3, 1], dtype=torch.float64)
    x = torch.randn(5, 97, dtype=torch.float64)
    assert small.to_dense().shape == (88, 97)
    small.path = "contract"
    assert torch.allclose(small(x), x @ small.to_dense().T + small.bias, atol=1e-12)


def test_flop_counts_by_hand(layer):
    # cores (1,5,5,4) (4,6,5,3) (3,3,4,1); in modes (5,5,4), out modes (5,6,3)
    rows = 7
    per_core = [
        2 * rows * 1 * (5 * 4) * 1 * 5 * 5 * 4,  # rest = 5*4 inputs left, lead = rows
        2 * rows * 5 * 4 * 4 * 5 * 6 * 3,  # lead = rows*5, rest = 4
        2 * rows * 30 * 1 * 3 * 4 * 3 * 1,  # lead = rows*5*6, rest = 1
    ]
    assert layer.contraction_flops(rows) == sum(per_core)
    # merging cores 2 and 3 first: one step less
    assert layer.contraction_flops(rows, cuts=(1,)) == per_core[0] + 2 * rows * 5 * 4 * 20 * 18
    assert layer.merge_flops((1,)) == 2 * 4 * 30 * 3 * 12
    assert layer.rebuild_flops() == layer.merge_flops(()) == 2 * 25 * 4 * 30 * 3 + 2 * 750 * 3 * 12


def test_path_choice_follows_the_cost_model(layer):
    for rows in (1, 16, 4096):
        for reuse in (True, False):
            layer.path = "auto"
            plan = layer.contraction_plan(rows, reuse)
            # the pick is the cheapest candidate, dense included
            layer.path = "dense"
            dense = layer.contraction_plan(rows, reuse)
            layer.path = "contract"
            contract = layer.contraction_plan(rows, reuse)
            assert dense.cuts == () and contract.cuts != ()
            # contract only when clearly cheaper than dense (the model's margin)
            expected = contract if contract.cost <= 0.5 * dense.cost else dense
            assert plan == expected
            assert contract.flops == layer.contraction_flops(rows, contract.cuts)
    layer.path = "auto"
    # training one row: rebuilding the whole weight is not worth it
    assert layer.choose_path(1, cached=False) == "contract"
    # a high-rank layer: rebuilding once and one matmul is cheaper at large batch
    full = TTLinear(64, 64, (4, 4, 4), (4, 4, 4), [1, 16, 16, 1])
    assert full.choose_path(4096, cached=True) == "dense"
    assert full.flops((4096, 64)) == 2 * 4096 * 64 * 64
    # a big low-rank layer contracts, with fewer FLOPs than dense
    thin = TTLinear(4096, 4096, (8, 8, 8, 8), (8, 8, 8, 8), [1, 8, 8, 8, 1])
    assert thin.choose_path(512) == "contract"
    assert thin.flops((512, 4096)) < 0.5 * 2 * 512 * 4096 * 4096


def test_merged_cores_are_cached_in_inference_only(layer):
    layer.path = "contract"
    x = torch.randn(3, 100, dtype=torch.float64)
    with torch.no_grad():
        y1 = layer(x)
        cached = dict(layer.__dict__["_weight_cache"])
        assert any(isinstance(k, tuple) and k[0] == "groups" for k in cached)
        layer.cores[1].mul_(2.0)  # a changed core invalidates the merged groups
        y2 = layer(x)
    assert torch.allclose(y2 - layer.bias, 2 * (y1 - layer.bias))
    layer.clear_dense_cache()
    layer(x).sum().backward()
    assert "_weight_cache" not in layer.__dict__ or not layer.__dict__["_weight_cache"]


def test_dense_cache_is_refreshed_when_a_core_changes(layer):
    layer.path = "dense"
    x = torch.randn(3, 100, dtype=torch.float64)
    with torch.no_grad():
        y1 = layer(x)
        layer.cores[0].mul_(2.0)
        y2 = layer(x)
    assert torch.allclose(y2 - layer.bias, 2 * (y1 - layer.bias))


def test_gradients_reach_every_core(layer):
    x = torch.randn(4, 100, dtype=torch.float64)
    for path in ("contract", "dense"):
        layer.zero_grad()
        layer.path = path
        layer(x).square().sum().backward()
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
        assert layer.bias.grad is not None


def test_counts_repr_config_and_stats(layer):
    assert layer.param_count() == 1 * 5 * 5 * 4 + 4 * 6 * 5 * 3 + 3 * 3 * 4 * 1 + 90
    assert "ranks=[1, 4, 3, 1]" in repr(layer)
    again = TTLinear.from_config(layer.config())
    assert [c.shape for c in again.cores] == [c.shape for c in layer.cores]
    stats = layer.tt_stats()
    assert stats["ranks"] == [1, 4, 3, 1]
    assert stats["core_norms"][0] == pytest.approx(float(layer.cores[0].detach().norm()))
    assert stats["core_max_abs"][1] == pytest.approx(float(layer.cores[1].detach().abs().max()))


def test_orthogonal_init_has_kaiming_scale():
    torch.manual_seed(0)
    lay = TTLinear(512, 512, (8, 8, 8), (8, 8, 8), [1, 16, 16, 1])
    target = (1.0 / (3 * 512)) ** 0.5
    assert float(lay.to_dense().std()) == pytest.approx(target, rel=0.05)
    first = lay.cores[0].reshape(-1, 16)
    assert torch.allclose(first.T @ first, torch.eye(16), atol=1e-5)


def test_layer_round_and_orthogonalize_in_place(layer):
    w = layer.to_dense().clone()
    layer.orthogonalize_("right")
    assert rel(layer.to_dense(), w) < 1e-12
    layer.round_(max_rank=2)
    assert layer.ranks == [1, 2, 2, 1]
    assert rel(layer.to_dense(), w) < 1.0


def test_torch_compile_matches_eager(layer):
    layer = layer.float()
    layer.path = "contract"
    x = torch.randn(8, 100)
    compiled = torch.compile(layer, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x), atol=1e-5)


# ---------------------------------------------------------------- surgery


def test_known_tt_rank_weight_is_recovered_through_surgery():
    _, w = known_tt([3, 4])
    model = nn.Sequential(linear_with(w))
    params = {"ranks": [3, 4], "in_factors": list(IN_F), "out_factors": list(OUT_F)}
    small = surgery.apply(model, spec(params), torch.randn(2, 84, dtype=torch.float64))
    rep = tnsurgery.get_manifest(small)["replacements"][0]
    assert rep["resolved"]["ranks"] == [3, 4]
    assert rep["weight_error"] < 1e-12 and rep["predicted_error"] < 1e-12
    assert isinstance(small[0], TTLinear)


@pytest.mark.parametrize(
    "params",
    [
        {"ranks": 6},
        {"rank": 6},
        {"param_ratio": 0.3},
        {"max_error": 0.5},
        {"energy": 0.8},
        {"rank_ratio": 0.5},
        {"ranks": [8, 3]},
    ],
)
def test_predicted_error_equals_measured(params):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192), nn.ReLU(), nn.Linear(192, 97))
    x = torch.randn(4, 256)
    planned = surgery.plan(model, spec(params, match="0"), x)
    small = surgery.apply(model, spec(params, match="0"), x)
    got = tnsurgery.get_manifest(small)["replacements"][0]
    assert got["predicted_error"] == pytest.approx(planned.targets[0].predicted_error, rel=1e-6)
    assert got["weight_error"] == pytest.approx(got["predicted_error"], rel=1e-5, abs=1e-6)
    if "max_error" in params:
        assert got["weight_error"] <= params["max_error"] + 1e-6
    if "param_ratio" in params:
        assert got["params_after"] <= params["param_ratio"] * got["params_before"]


def test_a_layer_that_would_not_shrink_is_skipped():
    model = nn.Sequential(nn.Linear(16, 16))
    p = surgery.plan(model, spec({"ranks": 64}))
    assert p.targets[0].status == "skip" and "would not shrink" in p.targets[0].reason


def test_bfloat16_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10)).to(torch.bfloat16)
    small = surgery.apply(model, spec({"ranks": 4}, match="0"))
    assert small[0].cores[0].dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert small(x).dtype == torch.bfloat16


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10))  # noqa: E731
    small = surgery.apply(make(), spec({"param_ratio": 0.3}, match="0"))
    tnsurgery.save(small, tmp_path / "tt")
    back = tnsurgery.load(tmp_path / "tt", make())
    x = torch.randn(5, 64)
    assert torch.equal(back(x), small(x))


def test_bad_tt_params_name_the_field():
    with pytest.raises(SpecError) as info:
        load_spec(spec({"ranks": [4, 4, 4], "d": 3}))
    assert "ranks needs d-1 = 2 values" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(spec({"ranks": 4, "rank": 4}))
    assert "give exactly one of" in str(info.value) and "ranks" in str(info.value)
    with pytest.raises(SpecError):
        load_spec(spec({"ranks": 0}))


@pytest.mark.parametrize("path", ["contract", "dense"])
def test_onnx_export_matches_eager(tmp_path, path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    layer = TTLinear(100, 90, (5, 5, 4), (5, 6, 3), [1, 4, 3, 1], path=path).eval()
    x = torch.randn(6, 100)
    out = tmp_path / "tt.onnx"
    torch.onnx.export(layer, (x,), str(out), dynamo=True)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    (got,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), layer(x), atol=1e-4)


def test_one_core_layer_contracts_as_one_matmul():
    single = TTLinear(6, 4, (6,), (4,), [1, 1], dtype=torch.float64)
    single.path = "contract"
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(single(x), x @ single.to_dense().T + single.bias)
