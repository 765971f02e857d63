"""tracing: torch.fx trace and the forward-hook fallback, FLOPs, shared modules and weights."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tnsurgery.layers import LowRankLinear
from tnsurgery.tracing import CallInfo, call_model, module_flops, sharing, trace

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models

MLP_TARGETS = ["fc1", "fc2", "fc3"]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ torch.fx


def test_fx_records_order_counts_and_shapes_of_an_mlp():
    model = models.mlp()
    x = torch.randn(4, 16)
    result = trace(model, MLP_TARGETS, x)
    assert result.method == "fx"
    assert result.error is None
    assert result.calls == {
        "fc1": CallInfo(order=0, calls=1, input_shape=(4, 16), output_shape=(4, 48)),
        "fc2": CallInfo(order=1, calls=1, input_shape=(4, 48), output_shape=(4, 48)),
        "fc3": CallInfo(order=2, calls=1, input_shape=(4, 48), output_shape=(4, 8)),
    }
    assert result.describe() == "torch.fx symbolic trace"


def test_call_order_follows_the_forward_not_the_target_list():
    result = trace(models.mlp(), ["fc3", "fc1"], torch.randn(2, 16))
    assert result.calls["fc1"].order == 0
    assert result.calls["fc3"].order == 1


def test_fx_without_sample_input_counts_calls_but_has_no_shapes():
    result = trace(models.mlp(), MLP_TARGETS)
    assert result.method == "fx"
    assert [result.calls[t].order for t in MLP_TARGETS] == [0, 1, 2]
    assert all(result.calls[t].calls == 1 for t in MLP_TARGETS)
    assert all(result.calls[t].input_shape is None for t in MLP_TARGETS)


def test_fx_records_shapes_of_a_cnn():
    result = trace(models.cnn(), ["conv1", "conv2", "fc"], torch.randn(2, 3, 16, 16))
    assert result.method == "fx"
    calls = result.calls
    assert (calls["conv1"].input_shape, calls["conv1"].output_shape) == (
        (2, 3, 16, 16),
        (2, 16, 16, 16),
    )
    assert (calls["conv2"].input_shape, calls["conv2"].output_shape) == (
        (2, 16, 16, 16),
        (2, 32, 8, 8),
    )
    assert (calls["fc"].input_shape, calls["fc"].output_shape) == ((2, 32), (2, 10))
    assert [calls[t].order for t in ("conv1", "conv2", "fc")] == [0, 1, 2]


def test_a_module_called_twice_is_counted_twice_by_both_paths():
    model, x = models.twice(), torch.randn(3, 16)
    for method in ("fx", "hooks"):
        result = trace(model, ["inp", "fc", "out"], x, method=method)
        assert result.method == method
        assert result.calls["fc"].calls == 2, method
        assert result.calls["inp"].calls == 1
        assert [result.calls[t].order for t in ("inp", "fc", "out")] == [0, 1, 2]


def test_fx_sees_a_weight_read_outside_the_module():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.fc(x)) + x @ self.fc.weight

    result = trace(ReadsWeight(), ["fc", "head"])
    assert result.calls["fc"].weight_read_directly
    assert not result.calls["head"].weight_read_directly


# ------------------------------------------------------------- the fallback


def test_data_dependent_control_flow_falls_back_to_hooks_with_the_fx_error():
    result = trace(models.branchy(), MLP_TARGETS, torch.randn(4, 16))
    assert result.method == "hooks"
    assert result.error and "TraceError" in result.error
    assert [result.calls[t].order for t in MLP_TARGETS] == [0, 1, 2]
    assert [result.calls[t].calls for t in MLP_TARGETS] == [1, 1, 1]
    assert result.calls["fc2"].input_shape == (4, 48)
    assert result.calls["fc3"].output_shape == (4, 8)
    assert "forward hooks on the sample input" in result.describe()
    assert result.error in result.describe()


def test_untraceable_without_sample_input_gives_no_trace_but_keeps_the_error():
    result = trace(models.branchy(), MLP_TARGETS)
    assert result.method == "none"
    assert result.error and "TraceError" in result.error
    assert all(info == CallInfo() for info in result.calls.values())
    assert "give a sample input" in result.describe()


def test_forcing_fx_on_an_untraceable_model_raises():
    with pytest.raises(Exception, match="symbolically traced variables"):
        trace(models.branchy(), MLP_TARGETS, torch.randn(4, 16), method="fx")


@pytest.mark.parametrize(
    "factory,targets,shape",
    [
        (models.mlp, MLP_TARGETS, (5, 16)),
        (models.cnn, ["conv1", "conv2", "fc"], (2, 3, 16, 16)),
    ],
)
def test_fx_and_hooks_record_the_same_calls(factory, targets, shape):
    model, x = factory(), torch.randn(shape)
    fx = trace(model, targets, x, method="fx")
    hooks = trace(model, targets, x, method="hooks")
    assert (fx.method, hooks.method) == ("fx", "hooks")
    assert fx.calls == hooks.calls


def test_tracing_leaves_the_model_as_it_was():
    model = models.mlp()
    model.train()
    model.fc2.eval()  # mixed modes must come back as they were
    before = copy.deepcopy(model)
    for method in ("fx", "hooks"):
        trace(model, MLP_TARGETS, torch.randn(2, 16), method=method)
    trace(models.branchy(), MLP_TARGETS, torch.randn(2, 16))
    assert _same_state(model, before)
    assert [m.training for m in model.modules()] == [m.training for m in before.modules()]
    assert all(not m._forward_hooks for m in model.modules())
    assert all(type(a) is type(b) for a, b in zip(model.modules(), before.modules(), strict=True))


def test_hooks_see_kwargs_and_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(5, 6)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = TwoInputs()
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    for sample in ((x, y), {"x": x, "y": y}):
        result = trace(model, ["a", "b"], sample, method="hooks")
        assert result.calls["a"].input_shape == (3, 4)
        assert result.calls["b"].input_shape == (3, 5)
    assert torch.equal(call_model(model, {"x": x, "y": y}), call_model(model, [x, y]))


# --------------------------------------------------------------------- FLOPs


def _counted_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def test_linear_flops_by_hand_and_by_torch_flop_counter():
    fc = nn.Linear(16, 48)
    assert module_flops(fc, (4, 10, 16)) == 2 * 4 * 10 * 16 * 48
    assert module_flops(fc, (4, 10, 16)) == _counted_flops(fc, torch.randn(4, 10, 16))
    assert module_flops(fc, None) == 2 * 16 * 48  # one row when the shape is unknown


@pytest.mark.parametrize(
    "conv,shape,by_hand",
    [
        (nn.Conv2d(3, 16, 3, padding=1), (2, 3, 16, 16), 2 * 2 * 16 * 16 * 16 * 3 * 9),
        (nn.Conv2d(16, 32, 3, stride=2, padding=1), (2, 16, 16, 16), 2 * 2 * 8 * 8 * 32 * 16 * 9),
        (nn.Conv2d(4, 8, 3, groups=2), (1, 4, 9, 9), 2 * 7 * 7 * 8 * 2 * 9),
        (
            nn.Conv2d(4, 8, (3, 5), dilation=(2, 1), stride=(2, 1), padding=(1, 2)),
            (1, 4, 11, 13),
            2 * 5 * 13 * 8 * 4 * 15,
        ),
        (nn.Conv2d(3, 6, 3), (3, 10, 10), 2 * 8 * 8 * 6 * 3 * 9),  # unbatched
    ],
)
def test_conv2d_flops_by_hand_and_by_torch_flop_counter(conv, shape, by_hand):
    assert module_flops(conv, shape) == by_hand
    assert module_flops(conv, shape) == _counted_flops(conv, torch.randn(shape))


def test_flops_unknown_without_shape_or_for_other_modules():
    assert module_flops(nn.Conv2d(3, 8, 3), None) is None
    assert module_flops(nn.ReLU(), (2, 8)) is None


def test_flops_of_a_surgery_layer_come_from_the_layer():
    layer = LowRankLinear(64, 32, rank=4)
    assert module_flops(layer, (10, 64)) == 2 * 10 * 4 * (64 + 32)
    assert module_flops(layer, (10, 64)) == _counted_flops(layer, torch.randn(10, 64))
    assert module_flops(layer, None) == 2 * 4 * (64 + 32)


# --------------------------------------------------------------------- sharing


def test_sharing_finds_tied_weights():
    aliases, tied = sharing(models.tied())
    assert tied["enc"] == ["dec"]
    assert tied["dec"] == ["enc"]
    assert "other" not in tied
    assert aliases["enc"] == [] and aliases["dec"] == []


def test_sharing_finds_an_embedding_tied_to_a_head():
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.head = nn.Linear(8, 10, bias=False)
    model.head.weight = model.embed.weight
    _, tied = sharing(model)
    assert tied == {"embed": ["head"], "head": ["embed"]}


def test_sharing_finds_a_module_registered_under_two_names():
    aliases, tied = sharing(models.aliased())
    assert aliases["first"] == ["second"]
    assert aliases["second"] == ["first"]
    assert aliases["last"] == []
    # one module under two names is not a tie with itself
    assert "first" not in tied and "second" not in tied


def test_sharing_of_an_ordinary_model_is_empty():
    aliases, tied = sharing(models.mlp())
    assert tied == {}
    assert all(others == [] for others in aliases.values())
