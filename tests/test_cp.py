"""CP-ALS, ``CPConv2d`` and the ``cp`` transform, checked against exact references.

References are built here, independently of tnsurgery: kernels with a known CP rank
from random factors (``torch.einsum``), the Eckart–Young error of a truncated SVD for
the matrix case, a dense ``nn.Conv2d`` holding ``to_dense()`` for the forward pass, and
the error measured on the built layer for the error the plan predicts.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.decompositions.cp import cp_als, cp_to_full, khatri_rao
from tnsurgery.layers.cp import CPConv2d
from tnsurgery.plugins import Registry
from tnsurgery.surgery import get_manifest
from tnsurgery.transform import Context
from tnsurgery.transforms import cp
from tnsurgery.transforms.cp import CPParams

# --- references and helpers --------------------------------------------------------------


def cp_registry() -> Registry:
    reg = Registry()
    cp.register_transforms(register=lambda t: reg.transforms.__setitem__(t.name, t))
    reg.origins["cp"] = "builtin"
    return reg


def known_cp_kernel(shape, rank: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``Σ_r a_r ∘ b_r ∘ c_r ∘ d_r`` with Gaussian factors: CP rank ``rank`` (generically,
    and uniquely so by Kruskal's condition for the shapes used here)."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(s, rank, generator=gen, dtype=torch.float64) for s in shape)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d).to(dtype)


def random_kernel(shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def conv_with(weight: torch.Tensor, bias: bool = True, **kw) -> nn.Conv2d:
    out, inp, kh, kwid = weight.shape
    conv = nn.Conv2d(inp, out, (kh, kwid), bias=bias, dtype=weight.dtype, **kw)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias:
            conv.bias.copy_(torch.linspace(-1, 1, out, dtype=weight.dtype))
    return conv


def small_convnet(dtype=torch.float32, rank: int = 5) -> nn.Sequential:
    """conv(6→12, 3×3) → ReLU → conv(12→10, 3×3, stride 2): both kernels of CP rank ``rank``."""
    return nn.Sequential(
        conv_with(known_cp_kernel((12, 6, 3, 3), rank, seed=1, dtype=dtype), padding=1),
        nn.ReLU(),
        conv_with(known_cp_kernel((10, 12, 3, 3), rank, seed=2, dtype=dtype), stride=2),
    ).eval()


def spec_for(params: dict, match: str = "**") -> dict:
    return {"version": 1, "rules": [{"match": match, "transform": "cp", "params": params}]}


def plan_one(module: nn.Module, input_shape=None, **params) -> cp.Decision:
    return cp.plan(module, CPParams(**params), Context(name="conv", input_shape=input_shape))


def seeded(layer: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer


# --- CP-ALS ------------------------------------------------------------------------------


def test_a_kernel_of_known_cp_rank_is_recovered_to_float_tolerance():
    t = known_cp_kernel((12, 10, 3, 3), 4)  # rank 4 > kh: the HOSVD start is padded
    errors = []
    for seed in range(3):
        res = cp_als(t, 4, max_iter=2000, tol=1e-14, seed=seed)
        approx = torch.einsum("or,ir,hr,wr->oihw", res.factors[0] * res.weights, *res.factors[1:])
        errors.append(rel_error(approx, t))
        assert res.fit == pytest.approx(1 - errors[-1], abs=1e-12)
    assert min(errors) < 1e-8


def test_the_matrix_case_reaches_the_truncated_svd_error():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 14, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    res = cp_als(m, 5, max_iter=500, tol=1e-13)
    eckart_young = math.sqrt(float(s[5:].square().sum() / s.square().sum()))
    assert 1 - res.fit == pytest.approx(eckart_young, rel=1e-6)


def test_fit_is_measured_and_factors_are_normalized():
    t = random_kernel((8, 6, 3, 3), dtype=torch.float64)
    res = cp_als(t, 5, max_iter=30, tol=0.0)
    assert res.iterations == 30 and not res.converged
    approx = torch.einsum("or,ir,hr,wr->oihw", res.factors[0] * res.weights, *res.factors[1:])
    assert res.fit == pytest.approx(1 - rel_error(approx, t), abs=1e-12)
    torch.testing.assert_close(cp_to_full(res.weights, res.factors), approx)
    for f in res.factors:
        torch.testing.assert_close(f.norm(dim=0), torch.ones(5, dtype=torch.float64))
    assert (res.weights >= 0).all()


def test_khatri_rao_is_the_columnwise_kronecker_product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    expected = torch.stack([torch.kron(a[:, r], b[:, r]) for r in range(4)], dim=1)
    torch.testing.assert_close(khatri_rao([a, b]), expected)


def test_als_is_deterministic_for_a_seed():
    t = random_kernel((6, 5, 3, 3), dtype=torch.float64)
    one, two = cp_als(t, 7, max_iter=20, seed=3), cp_als(t, 7, max_iter=20, seed=3)
    assert one.fit == two.fit
    for f, g in zip(one.factors, two.factors, strict=True):
        assert torch.equal(f, g)


def test_a_zero_tensor_is_represented_exactly():
    res = cp_als(torch.zeros(4, 3, 3, 3), 2)
    assert res.fit == 1.0 and res.converged
    assert torch.count_nonzero(cp_to_full(res.weights, res.factors)) == 0


# --- CPConv2d ----------------------------------------------------------------------------

VARIANTS = {
    "plain": {},
    "stride-padding": {"stride": (2, 1), "padding": (1, 2)},
    "dilation": {"dilation": (2, 1), "padding": (2, 0)},
    "same": {"padding": "same", "dilation": (1, 2)},
    "valid-no-bias": {"padding": "valid", "bias": False},
    "reflect": {"padding": (1, 2), "padding_mode": "reflect", "stride": 2},
    "circular": {"padding": (2, 1), "padding_mode": "circular"},
    "replicate": {"padding": 1, "padding_mode": "replicate", "dilation": 2},
}


def make_layer(variant: str = "plain", dtype=torch.float64) -> CPConv2d:
    return seeded(CPConv2d(4, 6, (3, 5), 3, dtype=dtype, **VARIANTS[variant]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_equals_the_dense_conv_of_to_dense(variant):
    layer = make_layer(variant)
    kw = dict(VARIANTS[variant])
    bias = kw.pop("bias", True)
    dense = conv_with(layer.to_dense().detach(), bias=bias, **kw)
    if bias:
        with torch.no_grad():
            dense.bias.copy_(layer.last.bias)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    y = layer(x)
    assert y.shape == dense(x).shape
    torch.testing.assert_close(y, dense(x), rtol=1e-10, atol=1e-10)
    assert layer.flops(tuple(x.shape)) > 0


def test_from_factors_rebuilds_the_cp_kernel():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), dtype=torch.float64)
    f = [torch.randn(s, 3, generator=gen, dtype=torch.float64) for s in (6, 4, 3, 2)]
    layer = CPConv2d.from_factors(conv, *f)
    torch.testing.assert_close(layer.to_dense(), torch.einsum("or,ir,hr,wr->oihw", *f))
    assert torch.equal(layer.last.bias, conv.bias)
    assert all(torch.equal(a, b) for a, b in zip(layer.factors(), f, strict=True))


def test_gradients_reach_every_parameter():
    layer = make_layer("stride-padding")
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_sizes_by_hand():
    layer = CPConv2d(4, 8, (3, 5), 2, stride=(2, 1), padding=(1, 2))
    assert layer.param_count() == 2 * (4 + 8 + 3 + 5) + 8 == 48
    assert CPConv2d(4, 8, (3, 5), 2, bias=False).param_count() == 40
    assert layer.to_dense().shape == (8, 4, 3, 5)
    # 9x9 input: rows (9 + 2 - 3) // 2 + 1 = 5 after the vertical conv, cols 9 throughout
    assert layer(torch.randn(2, 4, 9, 9)).shape == (2, 8, 5, 9)
    first, vertical, horizontal, last = 81 * 4 * 2, 5 * 9 * 2 * 3, 5 * 9 * 2 * 5, 5 * 9 * 2 * 8
    assert layer.flops((2, 4, 9, 9)) == 2 * 2 * (first + vertical + horizontal + last) == 8352
    assert layer.flops((4, 9, 9)) == 8352 // 2  # unbatched


def test_repr_and_config_text():
    layer = CPConv2d(4, 8, (3, 5), 2, stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    assert layer.extra_repr() == "4->2->8, kernel=3x5, rank=2, weight params 40/480 (8.3%)"
    assert "groups=2" in repr(layer)  # the depthwise convs say so
    assert layer.config() == {
        "in_channels": 4,
        "out_channels": 8,
        "kernel_size": [3, 5],
        "rank": 2,
        "stride": [2, 1],
        "padding": [1, 2],
        "dilation": [2, 1],
        "padding_mode": "zeros",
        "bias": True,
    }


@pytest.mark.parametrize("variant", ["stride-padding", "same", "valid-no-bias", "circular"])
def test_config_roundtrip_rebuilds_the_same_layer(variant):
    layer = make_layer(variant)
    config = layer.config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = CPConv2d.from_config(json.loads(json.dumps(config))).double()
    assert rebuilt.config() == config
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


def test_bfloat16_layer_keeps_its_dtype():
    layer = make_layer("stride-padding", dtype=torch.bfloat16)
    y = layer(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert y.dtype == layer.to_dense().dtype == torch.bfloat16


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++")
def test_torch_compile():
    torch._dynamo.reset()
    layer = make_layer("stride-padding", dtype=torch.float32)
    x = torch.randn(1, 4, 9, 9)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # inside torch's exporter
def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    layer = make_layer("stride-padding", dtype=torch.float32).eval()
    x = torch.randn(1, 4, 9, 9)
    path = tmp_path / "cp.onnx"
    torch.onnx.export(layer, (x,), str(path), dynamo=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert sum(node.op_type == "Conv" for node in model.graph.node) == 4
    (y,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), layer(x).detach(), rtol=1e-4, atol=1e-5)


# --- the cp transform --------------------------------------------------------------------


def test_plan_recovers_a_known_rank_kernel_and_reports_the_fit():
    conv = conv_with(known_cp_kernel((12, 10, 3, 3), 4))
    d = plan_one(conv, (1, 10, 8, 8), rank=4, als_iters=2000, tol=1e-14)
    assert d.skip_reason is None
    assert d.predicted_error < 1e-8
    assert d.resolved["rank"] == 4 and d.resolved["converged"] is True
    assert d.resolved["fit"] == pytest.approx(1 - d.predicted_error, abs=1e-12)
    assert 0 < d.resolved["iterations"] < 2000
    assert d.params_after == 4 * (12 + 10 + 3 + 3) + 12
    assert d.flops_after == d.state.flops((1, 10, 8, 8))
    torch.testing.assert_close(d.state.to_dense(), conv.weight.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_predicted_error_is_the_error_measured_after_surgery(dtype):
    model = small_convnet(dtype=dtype)
    reg = cp_registry()
    x = torch.randn(2, 6, 8, 8, dtype=dtype)
    planned = surgery.plan(model, spec_for({"rank": 3}), x, registry=reg)
    out = surgery.apply(model, spec_for({"rank": 3}), x, registry=reg)
    replacements = get_manifest(out)["replacements"]
    assert [r["name"] for r in replacements] == ["0", "2"]
    for rep, tp in zip(replacements, planned.targets, strict=True):
        assert tp.predicted_error == rep["predicted_error"] == rep["weight_error"]
        assert rep["weight_error"] == pytest.approx(
            rel_error(out[int(rep["name"])].to_dense(), model[int(rep["name"])].weight)
        )
        assert rep["resolved"]["rank"] == 3 and rep["resolved"]["iterations"] >= 1
        # the ALS fit (float64) against the error of the layer as built, in its dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
        assert rep["resolved"]["fit"] == pytest.approx(1 - rep["weight_error"], abs=tol)
        assert out[int(rep["name"])].first.weight.dtype == dtype
    assert tp.params_after == 3 * (10 + 12 + 3 + 3) + 10


def test_param_ratio_fits_the_budget_bias_included():
    conv = conv_with(random_kernel((16, 16, 3, 3)))
    dense, bias = 16 * 16 * 9, 16
    d = plan_one(conv, param_ratio=0.3)
    rank = d.resolved["rank"]
    assert d.params_after == rank * 38 + bias <= 0.3 * (dense + bias)
    assert (rank + 1) * 38 + bias > 0.3 * (dense + bias)


def test_rank_ratio_is_a_fraction_of_the_largest_cp_rank():
    conv = conv_with(random_kernel((16, 8, 3, 3)))
    # the largest CP rank of a 16x8x3x3 tensor is at most 8*3*3 = 72
    assert plan_one(conv, rank_ratio=0.25).resolved["rank"] == 18
    assert plan_one(conv, rank=1000).resolved["rank"] == 72  # clamped, then skipped:
    assert "would not shrink" in plan_one(conv, rank=1000).skip_reason


def test_max_error_finds_the_known_rank():
    conv = conv_with(known_cp_kernel((12, 10, 3, 3), 4, dtype=torch.float64))
    d = plan_one(conv, max_error=1e-6, als_iters=1000, tol=1e-13)
    assert d.skip_reason is None
    assert d.resolved["rank"] == 4 and d.predicted_error <= 1e-6
    tried = dict(d.resolved["search"])
    assert tried[3] > 1e-6 >= tried[4]  # rank 3 cannot fit a generic rank-4 kernel


def test_energy_reads_as_max_error_sqrt_one_minus_energy():
    conv = conv_with(random_kernel((8, 8, 3, 3)))
    by_energy = plan_one(conv, energy=0.75, als_iters=30)
    by_error = plan_one(conv, max_error=0.5, als_iters=30)
    assert by_energy.resolved["max_error"] == 0.5
    assert by_energy.resolved["rank"] == by_error.resolved["rank"]
    assert by_energy.predicted_error <= 0.5 + 1e-6
    smaller = dict(by_error.resolved["search"]).get(by_error.resolved["rank"] - 1)
    assert smaller is None or smaller > 0.5


def test_a_max_error_no_shrinking_rank_reaches_is_skipped_with_the_reason():
    conv = conv_with(random_kernel((4, 4, 3, 3)))
    d = plan_one(conv, max_error=0.01, als_iters=20)
    assert d.skip_reason.startswith("no rank that shrinks the layer reaches max_error 0.01")


def test_a_fit_below_min_fit_is_refused_with_the_fit():
    model = nn.Sequential(conv_with(random_kernel((16, 16, 3, 3), dtype=torch.float64))).eval()
    result = surgery.plan(model, spec_for({"rank": 2, "min_fit": 0.9}), registry=cp_registry())
    (tp,) = result.targets
    assert tp.status == "skip"
    fit = tp.resolved["fit"]
    assert fit < 0.9
    assert f"fit of {fit:.4f} at rank 2" in tp.reason and "min_fit 0.9" in tp.reason


def test_params_are_validated():
    reg = cp_registry()
    spec = tnsurgery.load_spec(spec_for({"param_ratio": 0.5, "als_iters": 20}), registry=reg)
    assert spec.rules[0].parsed_params.als_iters == 20
    for bad, message in [
        ({"rank": 2, "energy": 0.9}, "give exactly one of"),
        ({"rank": 2, "min_fit": 1.5}, "min_fit"),
        ({"rank": 2, "als_iter": 5}, "als_iter"),
    ]:
        with pytest.raises(tnsurgery.SpecError, match=message):
            tnsurgery.load_spec(spec_for(bad), registry=reg)


def test_the_json_schema_checks_cp_params():
    jsonschema = pytest.importorskip("jsonschema")
    from tnsurgery.spec import json_schema

    validator = jsonschema.Draft202012Validator(json_schema(cp_registry()))
    assert validator.is_valid(spec_for({"rank": 8, "als_iters": 50, "min_fit": 0.3}))
    assert not validator.is_valid(spec_for({"rank": 8, "energy": 0.9}))
    assert not validator.is_valid(spec_for({"rank": 8, "min_fit": 2}))


def test_grouped_convs_are_skipped():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    assert "groups=2" in plan_one(conv, rank=2).skip_reason


def test_a_layer_that_would_not_shrink_is_skipped_before_any_als():
    conv = nn.Conv2d(3, 4, 1)  # 12 weights; rank 1 alone needs 3 + 4 + 1 + 1 = 9
    d = plan_one(conv, rank=2)
    assert d.skip_reason == "would not shrink: rank 2 needs 18 weight params, dense has 12"
    assert "fit" not in d.resolved


def test_plan_is_deterministic_for_a_seed():
    conv = conv_with(random_kernel((8, 6, 3, 3)))
    one, two = plan_one(conv, rank=5, seed=1), plan_one(conv, rank=5, seed=1)
    assert one.predicted_error == two.predicted_error
    for p, q in zip(one.state.parameters(), two.state.parameters(), strict=True):
        assert torch.equal(p, q)


def test_apply_leaves_the_global_rng_alone():
    model, x = small_convnet(), torch.randn(1, 6, 8, 8)
    torch.manual_seed(999)
    before = torch.get_rng_state()
    surgery.apply(model, spec_for({"rank": 7}), x, registry=cp_registry())  # 7 > kh: seeded
    assert torch.equal(torch.get_rng_state(), before)


def test_surgered_model_matches_with_every_padding_mode():
    model = nn.Sequential(
        conv_with(
            known_cp_kernel((8, 4, 3, 3), 3, dtype=torch.float32),
            padding=1,
            padding_mode="circular",
        ),
        conv_with(
            known_cp_kernel((6, 8, 3, 3), 3, dtype=torch.float32),
            padding=1,
            padding_mode="reflect",
            stride=2,
        ),
    ).eval()
    x = torch.randn(1, 4, 10, 10)
    out = surgery.apply(
        model, spec_for({"rank": 3, "als_iters": 500, "tol": 1e-12}), x, registry=cp_registry()
    )
    assert isinstance(out[0], CPConv2d) and isinstance(out[1], CPConv2d)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_surgery_matches_the_cpu_one():
    model, x = small_convnet(), torch.randn(2, 6, 8, 8)
    on_cpu = surgery.apply(model, spec_for({"rank": 3}), x, registry=cp_registry())
    on_gpu = surgery.apply(model.cuda(), spec_for({"rank": 3}), x.cuda(), registry=cp_registry())
    assert on_gpu[0].first.weight.device.type == "cuda"
    for rep in get_manifest(on_gpu)["replacements"]:
        assert rep["predicted_error"] == rep["weight_error"]
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), on_cpu(x), rtol=1e-4, atol=1e-4)


def test_save_then_load_gives_identical_outputs(tmp_path):
    reg = cp_registry()
    model = small_convnet()
    x = torch.randn(1, 6, 8, 8)
    out = surgery.apply(model, spec_for({"rank": 3}), x, registry=reg)
    path = tnsurgery.save(out, tmp_path / "model")
    loaded = tnsurgery.load(path, small_convnet(), registry=reg)
    assert isinstance(loaded[0], CPConv2d) and loaded[0].config() == out[0].config()
    torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)
