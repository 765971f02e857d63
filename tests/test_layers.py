"""LowRankLinear and LowRankConv2d: forward, gradients, sizes, repr, config, pickle, compile.

Every layer goes through the same battery (as einops does for its layers); the
reference for the forward pass is always the dense op with ``to_dense()``.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.layers import LowRankConv2d, LowRankLinear, SurgeryLayer


def seeded(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter (bias included) with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer


def make_linear(bias: bool = True) -> LowRankLinear:
    return seeded(LowRankLinear(10, 6, 3, bias=bias))


def make_conv(bias: bool = True) -> LowRankConv2d:
    return seeded(
        LowRankConv2d(4, 8, (3, 3), 2, stride=(2, 2), padding=(1, 1), dilation=(1, 1), bias=bias)
    )


LAYERS = {
    "linear": (make_linear, (4, 5, 10)),
    "linear-no-bias": (lambda: make_linear(bias=False), (7, 10)),
    "conv": (make_conv, (2, 4, 9, 9)),
    "conv-no-bias": (lambda: make_conv(bias=False), (1, 4, 8, 6)),
}


@pytest.fixture(params=list(LAYERS), name="layer_and_input")
def layer_and_input_fixture(request):
    factory, shape = LAYERS[request.param]
    gen = torch.Generator().manual_seed(1)
    return factory(), torch.randn(shape, generator=gen)


def bias_of(layer: SurgeryLayer) -> torch.Tensor | None:
    return layer.bias if isinstance(layer, LowRankLinear) else layer.second.bias


def dense_forward(layer: SurgeryLayer, x: torch.Tensor) -> torch.Tensor:
    """The dense op the layer replaces, with its rebuilt weight."""
    w = layer.to_dense()
    if isinstance(layer, LowRankLinear):
        return F.linear(x, w, layer.bias)
    c = layer.first
    return F.conv2d(x, w, bias_of(layer), c.stride, c.padding, c.dilation)


# --- the battery, on every layer ---------------------------------------------------------


def test_forward_equals_dense(layer_and_input):
    layer, x = layer_and_input
    torch.testing.assert_close(layer(x), dense_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_linear_forward_is_x_v_ut_plus_b():
    layer = make_linear()
    x = torch.randn(4, 10, dtype=torch.float64)
    layer = layer.double()
    expected = x @ layer.v.T @ layer.u.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


def test_gradients_reach_every_parameter(layer_and_input):
    layer, x = layer_and_input
    x = x.clone().requires_grad_(True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_match_the_dense_layer():
    # dL/dW of the dense layer, chained through W = u v, equals the factors' gradients
    layer = make_linear().double()
    x = torch.randn(5, 10, dtype=torch.float64)
    target = torch.randn(5, 6, dtype=torch.float64)
    F.mse_loss(layer(x), target).backward()
    w = layer.to_dense().detach().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    F.mse_loss(F.linear(x, w, b), target).backward()
    torch.testing.assert_close(layer.u.grad, w.grad @ layer.v.detach().T)
    torch.testing.assert_close(layer.v.grad, layer.u.detach().T @ w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


def test_config_roundtrip_rebuilds_the_same_layer(layer_and_input):
    layer, x = layer_and_input
    config = layer.config()
    assert json.loads(json.dumps(config)) == config  # JSON-compatible
    rebuilt = type(layer).from_config(config)
    assert type(rebuilt) is type(layer)
    assert rebuilt.config() == config
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


def test_pickle_roundtrip(layer_and_input):
    layer, x = layer_and_input
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(layer)
    assert loaded.config() == layer.config()
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)


def test_state_dict_roundtrip_through_weights_only_load(layer_and_input):
    layer, x = layer_and_input
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = type(layer).from_config(layer.config())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_extra_repr_is_readable(layer_and_input):
    layer, _ = layer_and_input
    text = repr(layer)
    assert type(layer).__name__ in text
    assert f"rank={layer.rank}" in text
    assert "weight params" in text


def test_dtype_and_device_follow_the_module(layer_and_input):
    layer, x = layer_and_input
    double = layer.to(torch.float64)
    y = double(x.double())
    assert y.dtype == torch.float64
    assert double.to_dense().dtype == torch.float64


# --- exact numbers ------------------------------------------------------------------------


def test_linear_sizes():
    layer = LowRankLinear(10, 6, 3)
    assert layer.v.shape == (3, 10) and layer.u.shape == (6, 3)
    assert layer.to_dense().shape == (6, 10)
    assert layer.param_count() == 3 * 10 + 6 * 3 + 6 == 54
    assert LowRankLinear(10, 6, 3, bias=False).param_count() == 48
    # 2 FLOPs per multiply-add, 20 rows, through rank 3 both ways
    assert layer.flops((4, 5, 10)) == 2 * 20 * 3 * (10 + 6) == 1920
    assert layer.flops((10,)) == 2 * 1 * 3 * 16


def test_linear_repr_text():
    layer = LowRankLinear(10, 6, 3)
    assert layer.extra_repr() == (
        "in_features=10, out_features=6, rank=3, bias=True, weight params 48/60 (80.0%)"
    )
    assert layer.config() == {"in_features": 10, "out_features": 6, "rank": 3, "bias": True}


def test_conv_sizes():
    layer = LowRankConv2d(4, 8, (3, 3), 2, stride=(2, 2), padding=(1, 1))
    # first: 2 x 4 x 3 x 3, second: 8 x 2 x 1 x 1 + bias 8
    assert layer.param_count() == 2 * 4 * 9 + 8 * 2 + 8 == 96
    assert layer.to_dense().shape == (8, 4, 3, 3)
    # 9x9 input, stride 2, padding 1: (9 + 2 - 3) // 2 + 1 = 5 x 5 outputs
    assert layer(torch.randn(2, 4, 9, 9)).shape == (2, 8, 5, 5)
    assert layer.flops((2, 4, 9, 9)) == 2 * 2 * 25 * 2 * (4 * 9 + 8) == 8800
    assert layer.flops((4, 9, 9)) == 8800 // 2  # unbatched


def test_conv_repr_and_config_text():
    layer = LowRankConv2d(4, 8, (3, 5), 2, stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    assert layer.extra_repr() == ("4->2->8, kernel=3x5, rank=2, weight params 136/480 (28.3%)")
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


def test_conv_string_padding_roundtrips():
    layer = seeded(LowRankConv2d(3, 6, (3, 3), 2, padding="same", padding_mode="circular"))
    x = torch.randn(1, 3, 7, 7)
    assert layer(x).shape == (1, 6, 7, 7)
    assert layer.flops((1, 3, 7, 7)) == 2 * 49 * 2 * (3 * 9 + 6)
    rebuilt = LowRankConv2d.from_config(json.loads(json.dumps(layer.config())))
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    dense = nn.Conv2d(3, 6, 3, padding="same", padding_mode="circular")
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.second.bias)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_from_factors_keeps_dtype_and_values():
    u = torch.randn(6, 3, dtype=torch.float64)
    v = torch.randn(3, 10, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    layer = LowRankLinear.from_factors(u, v, b)
    assert layer.u.dtype == torch.float64
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v) and torch.equal(layer.bias, b)
    assert torch.equal(layer.to_dense(), u @ v)
    assert LowRankLinear.from_factors(u, v, None).bias is None


def test_fresh_layer_has_a_dense_layers_scale():
    # reset_parameters: u @ v has the variance of a Kaiming-uniform dense weight, 1 / (3 in)
    torch.manual_seed(0)
    layer = LowRankLinear(256, 256, 64)
    var = float(layer.to_dense().detach().var())
    assert var == pytest.approx(1 / (3 * 256), rel=0.1)
    assert torch.count_nonzero(layer.bias) == 0


# --- torch.compile -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++")
def test_torch_compile_on_cpu():
    torch._dynamo.reset()
    linear = make_linear()
    x = torch.randn(2, 10)
    try:
        compiled = torch.compile(linear, fullgraph=True)  # inductor: C++ codegen
        y = compiled(x)
    except Exception as exc:  # a broken toolchain is not our bug
        if "InductorError" in type(exc).__name__ or "CppCompileError" in str(exc):
            pytest.skip(f"inductor cannot compile here: {type(exc).__name__}")
        raise
    torch.testing.assert_close(y, linear(x), rtol=1e-5, atol=1e-5)
    # the conv through the graph capture only (inductor's conv codegen is slow on CPU)
    conv = make_conv()
    xc = torch.randn(1, 4, 9, 9)
    compiled_conv = torch.compile(conv, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_conv(xc), conv(xc), rtol=1e-5, atol=1e-5)
