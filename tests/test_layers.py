"""LowRankLinear and LowRankConv2d in numbers (forward, gradients, sizes, repr, config,
compile), and the training hooks of the layer contract (progressive rank, TT hygiene)
with the recipes that call them.

The checks every layer class passes (forward against the dense op with
``to_dense()``, gradients, config and pickle round trips, compile, ONNX, dtype and
device moves) are in ``tests/test_layer_battery.py``, over every registered layer.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.errors import UserInputError
from tnsurgery.layers import LowRankConv2d, LowRankLinear, SurgeryLayer
from tnsurgery.layers.tt import TTLinear
from tnsurgery.training import recipes


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


def bias_of(layer: SurgeryLayer) -> torch.Tensor | None:
    return layer.bias if isinstance(layer, LowRankLinear) else layer.second.bias


def dense_forward(layer: SurgeryLayer, x: torch.Tensor) -> torch.Tensor:
    """The dense op the layer replaces, with its rebuilt weight."""
    w = layer.to_dense()
    if isinstance(layer, LowRankLinear):
        return F.linear(x, w, layer.bias)
    c = layer.first
    return F.conv2d(x, w, bias_of(layer), c.stride, c.padding, c.dilation)


# --- the bias branches the battery (tests/test_layer_battery.py) does not build ------------


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(lambda: make_linear(bias=False), (7, 10)), (make_conv, (2, 4, 9, 9))],
    ids=["linear-no-bias", "conv-with-bias"],
)
def test_other_bias_branch_matches_the_dense_op_and_round_trips(factory, shape):
    layer, x = factory(), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), dense_forward(layer, x), rtol=1e-5, atol=1e-5)
    rebuilt = type(layer).from_config(json.loads(json.dumps(layer.config())))
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


# --- exact numbers ------------------------------------------------------------------------


def test_linear_forward_is_x_v_ut_plus_b():
    layer = make_linear()
    x = torch.randn(4, 10, dtype=torch.float64)
    layer = layer.double()
    expected = x @ layer.v.T @ layer.u.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


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


@pytest.mark.parametrize("layer", [make_linear(), make_conv()], ids=["linear", "conv"])
def test_extra_repr_is_readable(layer):
    text = repr(layer)
    assert type(layer).__name__ in text
    assert f"rank={layer.rank}" in text
    assert "weight params" in text


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


# --- the training hooks of the layer contract ---------------------------------------------


def test_lowrank_linear_is_cut_by_truncation():
    layer = make_linear()
    assert layer.cuttable_ranks() == (3,)
    expected = make_linear().truncate_(2)
    layer.cut_ranks_((2,))
    assert layer.cuttable_ranks() == (2,) and layer.config()["rank"] == 2
    assert torch.equal(layer.u, expected.u) and torch.equal(layer.v, expected.v)
    layer.cut_ranks_((7,))  # above the current rank: kept
    assert layer.rank == 2


def test_a_layer_without_hooks_has_no_rank_to_cut_and_nothing_to_tend():
    layer = make_conv()  # factorized convs are not cut by progressive rank
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.cuttable_ranks() is None and layer.training_stats() is None
    with pytest.raises(NotImplementedError, match="LowRankConv2d has no rank to cut"):
        layer.cut_ranks_((1,))
    layer.clip_norms_(1e-3)
    layer.balance_norms_()
    layer.reorthogonalize_()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def make_tt() -> TTLinear:
    torch.manual_seed(0)
    return TTLinear(20, 24, (4, 5), (4, 6), [1, 4, 1], dtype=torch.float64)


def test_tt_cut_is_rounding_to_the_inner_ranks():
    layer = make_tt()
    assert layer.cuttable_ranks() == (4,)
    expected = make_tt().round_(max_rank=[2])
    layer.cut_ranks_((2,))
    assert layer.cuttable_ranks() == (2,) and layer.config()["ranks"] == [1, 2, 1]
    torch.testing.assert_close(layer.to_dense(), expected.to_dense())


def test_tt_hygiene_hooks():
    layer = make_tt()
    with torch.no_grad():
        layer.cores[0].mul_(10.0)
    w = layer.to_dense().detach().clone()
    norms = [float(c.detach().norm()) for c in layer.cores]
    layer.balance_norms_()  # the geometric mean each, the weight unchanged
    mean = math.sqrt(norms[0] * norms[1])
    assert [float(c.detach().norm()) for c in layer.cores] == pytest.approx([mean, mean])
    torch.testing.assert_close(layer.to_dense(), w)
    layer.clip_norms_(mean / 2)  # each core scaled down to the limit
    assert [float(c.detach().norm()) for c in layer.cores] == pytest.approx([mean / 2] * 2)
    torch.testing.assert_close(layer.to_dense(), w / 4)
    layer.reorthogonalize_()  # left-canonical: the first core's columns orthonormal
    first = layer.cores[0].detach().reshape(-1, layer.cores[0].shape[-1])
    torch.testing.assert_close(first.T @ first, torch.eye(first.shape[1], dtype=first.dtype))
    torch.testing.assert_close(layer.to_dense(), w / 4)
    assert layer.training_stats() == layer.tt_stats()
    assert layer.training_stats()["ranks"] == [1, 4, 1]


class ShrinkableLinear(SurgeryLayer):
    """A plugin-style layer that opts into progressive rank and the hygiene hooks."""

    def __init__(self, in_features: int = 6, out_features: int = 5, ranks=(4, 3)):
        super().__init__()
        self.ranks = tuple(ranks)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.clipped: list[float] = []

    def forward(self, x):
        return F.linear(x, self.weight)

    def to_dense(self):
        return self.weight

    def cuttable_ranks(self):
        return self.ranks

    def cut_ranks_(self, ranks):
        self.ranks = tuple(min(r, c) for r, c in zip(ranks, self.ranks, strict=True))

    def clip_norms_(self, max_norm):
        self.clipped.append(max_norm)

    def training_stats(self):
        return {"ranks": list(self.ranks)}


def progressive(steps: int = 6, final: float = 0.25, stages: int = 3):
    """What ``recipes.shrink`` reads of the training options."""
    return SimpleNamespace(
        steps=steps, progressive_rank=SimpleNamespace(final=final, stages=stages)
    )


def test_progressive_rank_cuts_any_layer_that_has_ranks_to_cut():
    model = nn.Sequential(ShrinkableLinear(), make_linear(), make_conv())
    names = ["0", "1", "2"]
    opts = progressive()
    recipes.shrink(model, names, opts, 1)  # before the first cut: nothing
    assert model[0].ranks == (4, 3) and model[1].rank == 3
    recipes.shrink(model, names, opts, 2)  # stage 1: half the start ranks
    assert model[0].ranks == (2, 2) and model[1].rank == 2
    recipes.shrink(model, names, opts, 4)  # stage 2: a quarter
    assert model[0].ranks == (1, 1) and model[1].rank == 1
    assert model.__dict__["_start_ranks"] == {"0": [4, 3], "1": [3]}
    assert model[2].rank == 2  # no ranks to cut: left as it is


def test_progressive_rank_reads_the_start_rank_of_older_checkpoints():
    model = nn.Sequential(make_linear())
    model.__dict__["_start_ranks"] = {"0": 3}  # a low-rank layer's start rank, as an int
    recipes.shrink(model, ["0"], progressive(), 2)
    assert model[0].rank == 2


def test_progressive_rank_without_a_layer_to_cut_names_what_it_cuts():
    model = nn.Sequential(make_conv())
    with pytest.raises(UserInputError, match="this model has none it can cut"):
        recipes.shrink(model, ["0"], progressive(), 2)


@dataclass
class TTOpts:
    """The fields of the ``training.tt`` options ``recipes.tt_hygiene`` reads."""

    clip_core_norm: float | None = None
    normalize_cores: bool = False
    reorthogonalize_every: int | None = None
    log_stats_every: int | None = None


def test_tt_hygiene_goes_through_the_hooks_of_every_layer():
    model = nn.Sequential(ShrinkableLinear(), make_tt().float(), make_linear())
    assert recipes.tt_hygiene(model, TTOpts(), 2) == {}
    logged = recipes.tt_hygiene(model, TTOpts(clip_core_norm=0.5, log_stats_every=2), 2)
    assert model[0].clipped == [0.5]
    assert max(float(c.detach().norm()) for c in model[1].cores) <= 0.5 + 1e-6
    assert logged == {"tt_stats.0": {"ranks": [4, 3]}, "tt_stats.1": model[1].tt_stats()}
    assert recipes.tt_hygiene(model, TTOpts(log_stats_every=2), 3) == {}
