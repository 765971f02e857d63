"""Replacement layers stay drop-in where model code reads attributes of the layer it calls.

Hugging Face T5 casts its hidden states to ``self.wo.weight.dtype`` at every
forward; other model code reads ``weight.device``, ``weight.shape``,
``in_features``, a conv's ``stride``... Every layer the battery builds
(:data:`test_layer_battery.CASES`, one per registered layer class and source)
is checked here for those attributes; a tiny T5 is factorized, run, saved and
loaded end to end.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_layer_battery import CASE_IDS, CASES, GRAPH_BREAKS, ONNX_UNSUPPORTED, Case, _input
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.decompositions.conv1d import linear_features, linear_weight
from tnsurgery.layer import DenseWeight, SurgeryLayer
from tnsurgery.plugins import qualified_name
from tnsurgery.tracing import trace

# Layer classes that do not answer ``weight`` yet, with the reason (an expected
# failure while they raise AttributeError; the checks run in full once they answer).
NO_WEIGHT_YET: dict[str, str] = {}

CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")


@pytest.fixture(params=CASES, ids=CASE_IDS, name="case")
def case_fixture(request) -> Case:
    return request.param


def _weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight``; an expected failure for the classes of :data:`NO_WEIGHT_YET`."""
    try:
        return layer.weight
    except AttributeError:
        reason = NO_WEIGHT_YET.get(qualified_name(type(layer)))
        if reason is None:
            raise
        pytest.xfail(reason)


def _stand_in(layer: nn.Module) -> DenseWeight:
    """``layer.weight`` where it is a :class:`DenseWeight` (not a layer's real weight)."""
    w = _weight(layer)
    if not isinstance(w, DenseWeight):
        pytest.skip(f"{type(layer).__name__} holds a real weight")
    return w


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = float(b.detach().abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1.0))


def _dense_call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The replaced op, rebuilt from the layer's drop-in attributes alone (with the
    input fake-quantized as the layer does it, where a ``qat`` layer quantizes it)."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        x = quantizer.fake(x)
    if hasattr(layer, "in_features"):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(
        x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


# ----------------------------------------------------------------- every layer class


def test_weight_has_the_replaced_weights_shape_dtype_and_device(case):
    built = case.build()
    # a layer replacing GPT-2's Conv1D reports the (out, in) weight of the Linear it
    # computes, as factorize and tt rebuild it (Conv1D stores its transpose)
    layer, reference = built.layer, linear_weight(built.dense)
    w = _weight(layer)
    assert isinstance(w, torch.Tensor)
    assert w.shape == reference.shape and w.size() == reference.size()
    assert w.dtype == reference.dtype and w.device == reference.device
    assert w.ndim == reference.ndim and w.numel() == reference.numel() and len(w) == len(reference)
    assert w.is_floating_point()
    if isinstance(w, DenseWeight):  # a stand-in: stored nowhere, over one element
        assert "weight" not in layer.state_dict()
        assert "weight" not in dict(layer.named_parameters(recurse=False))
        assert "weight" not in dict(layer.named_buffers(recurse=False))
        assert "weight" not in layer.__dict__
        with torch._C.DisableTorchFunctionSubclass():
            assert w.untyped_storage().nbytes() == w.element_size()
        assert "DenseWeight(shape=" in repr(w) and f"{w}" == repr(w)  # no values shown
    with torch.no_grad():
        _close(w.clone(), layer.to_dense())  # the values, where read: the dense weight


def test_weight_follows_dtype_and_device_moves(case):
    layer = case.build().layer
    _weight(layer)
    keys = set(layer.state_dict())
    for move in (lambda m: m.to(torch.float64), lambda m: m.double()):
        moved = move(copy.deepcopy(layer))
        assert moved.weight.dtype == torch.float64
        assert set(moved.state_dict()) == keys
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    meta = copy.deepcopy(layer).to("meta")
    assert meta.weight.is_meta and meta.weight.shape == layer.weight.shape
    if torch.cuda.is_available():
        assert copy.deepcopy(layer).cuda().weight.is_cuda


def test_linear_and_conv_attributes_are_the_replaced_modules(case):
    built = case.build()
    layer, dense, x = built.layer.eval(), built.dense, _input(case.kind)
    w = _weight(layer)
    if case.kind == "Linear":
        assert (layer.in_features, layer.out_features) == (dense.in_features, dense.out_features)
    elif case.kind == "Conv1D":
        assert (layer.in_features, layer.out_features) == linear_features(dense)
    else:
        for name in CONV_ATTRIBUTES:
            assert getattr(layer, name) == getattr(dense, name), name
        assert layer.groups == dense.groups
        assert getattr(layer, "padding_mode", "zeros") == dense.padding_mode
    assert (layer.bias is None) == (dense.bias is None)
    with torch.no_grad():  # the replaced op, from the layer's attributes alone
        out = layer(x)  # (a qat layer observes its input first)
        _close(_dense_call(layer, x, w), out, 1e-4)


def test_computing_with_the_weight_trains_the_factors(case):
    layer, x = case.build().layer.train(), _input(case.kind)
    w = _stand_in(layer)
    assert w.requires_grad == any(p.requires_grad for p in layer.parameters())
    if not w.requires_grad:  # nothing to train (an exported layer without bias)
        assert not _dense_call(layer, x, w).requires_grad
        return
    _dense_call(layer, x, w).square().sum().backward()
    for name, p in layer.named_parameters():
        if name.rpartition(".")[2] != "bias":  # every factor the weight is built from
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.weight.grad is None  # (gradients go to the factors)
    layer.requires_grad_(False)
    assert not layer.weight.requires_grad


def test_writing_to_the_weight_raises(case):
    layer = case.build().layer
    w = _stand_in(layer)
    before = layer.to_dense().detach().clone()
    writes = [
        lambda: w.copy_(torch.ones(w.shape)),
        lambda: w.mul_(2),
        lambda: w.data.zero_(),
        lambda: nn.init.normal_(w),
        lambda: w.__setitem__(0, 1.0),
        lambda: w.__iadd__(1.0),
        lambda: torch.mul(torch.ones(w.shape), 2, out=w),
    ]
    for write in writes:
        with pytest.raises(RuntimeError, match="set its parameters instead"):
            with torch.no_grad():
                write()
    assert w.data is w
    torch.testing.assert_close(layer.to_dense(), before, rtol=0, atol=0)
    target = torch.zeros(w.shape)  # reading it into another tensor is no write to it
    with torch.no_grad():
        target.copy_(w)
    _close(target, before)


def test_pickles_copies_and_saves_hold_no_stand_in(case):
    layer = case.build().layer.eval()
    w = _stand_in(layer)
    dense = layer.to_dense().detach()
    for loaded in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert "weight" not in loaded.__dict__
        assert isinstance(loaded.weight, DenseWeight) and loaded.weight.shape == w.shape
        assert loaded.weight._layer is loaded
    for copied in (pickle.loads(pickle.dumps(w)), copy.deepcopy(w)):  # the values, plain
        assert type(copied) is torch.Tensor
        _close(copied, dense)
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["w"]
    assert type(saved) is torch.Tensor
    _close(saved, dense)


class _ReadsDtype(nn.Module):
    """T5's ``T5DenseActDense``: the input cast to the layer's weight dtype first."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        if isinstance(w, torch.Tensor) and x.dtype != w.dtype and w.dtype != torch.int8:
            x = x.to(w.dtype)
        return self.layer(x) * w.shape[0]


class _ComputesWithWeight(nn.Module):
    """A model that reads the layer's weight to compute (as a tied head does)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + _dense_call(self.layer, x, self.layer.weight)


def test_weight_metadata_under_torch_compile_and_onnx_export(case, tmp_path):
    layer, x = case.build().layer.eval(), _input(case.kind)
    _weight(layer)
    model = _ReadsDtype(layer)
    with torch.no_grad():
        expected = model(x.double())  # cast to the layer's dtype first
        assert expected.dtype == layer.weight.dtype
    torch._dynamo.reset()
    fullgraph = qualified_name(type(layer)) not in GRAPH_BREAKS
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    with torch.no_grad():
        _close(compiled(x.double()), expected)
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    if qualified_name(type(layer)) in ONNX_UNSUPPORTED:
        return
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    exported = onnx.load(str(path))
    (got,) = ReferenceEvaluator(exported).run(None, {exported.graph.input[0].name: x.numpy()})
    _close(torch.from_numpy(got), expected, 1e-4)


def test_tracing_still_sees_a_model_compute_with_the_weight(case):
    """tnsurgery.tracing refuses targets whose weight the model reads directly: a read
    of a replacement layer's weight is recorded as a Linear's is (``get_attr``)."""
    layer, x = case.build().layer.eval(), _input(case.kind)
    _weight(layer)
    if not any(True for _ in layer.parameters()):
        pytest.skip("torch.fx records reads of parameters only: this layer holds buffers")
    model = _ComputesWithWeight(layer)
    result = trace(model, ["layer"], x)
    assert result.method == "fx", result.error
    assert result.calls["layer"].weight_read_directly
    assert result.calls["layer"].calls == 1
    assert trace(nn.Sequential(layer), ["0"], x).calls["0"].weight_read_directly is False


# ----------------------------------------------------------------- the contract


class _Gate(SurgeryLayer):
    """A layer that replaces no Linear nor conv."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


class _RealWeight(SurgeryLayer):
    """A plugin layer holding a real ``weight`` Parameter, registered when the layer
    already answers ``weight`` (its sizes and a float parameter are set)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 3, 2
        self.bias = nn.Parameter(torch.zeros(2))
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def to_dense(self):
        return self.weight


class _NoDense(SurgeryLayer):
    """A Linear-like plugin layer without ``to_dense()``."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 3, 2
        self.a = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x):
        return F.linear(x, self.a)


def test_a_layer_that_replaces_no_linear_nor_conv_has_no_weight():
    layer = _Gate()
    assert layer.weight_shape() is None
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match="'_Gate' object has no attribute 'weight'"):
        layer.weight  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'other'"):
        layer.other  # noqa: B018


def test_a_real_weight_is_kept():
    layer = _RealWeight()
    assert layer.weight is layer._parameters["weight"]
    assert "weight" in layer.state_dict()
    result = trace(_ComputesWithWeight(layer), ["layer"], torch.randn(4, 3))
    assert result.calls["layer"].weight_read_directly


def test_a_real_weight_registers_as_a_buffer_a_module_or_a_plain_attribute():
    layer = _NoDense()
    assert isinstance(layer.weight, DenseWeight)
    plain = torch.ones(2, 3)
    layer.weight = plain  # a plain attribute, as on any nn.Module
    assert layer.weight is plain and "weight" not in layer.state_dict()
    del layer.weight
    assert isinstance(layer.weight, DenseWeight)
    layer.register_buffer("weight", torch.zeros(2, 3))
    assert layer.weight is layer._buffers["weight"] and "weight" in layer.state_dict()
    other = _NoDense()
    other.add_module("weight", nn.Identity())
    assert isinstance(other.weight, nn.Identity)


def test_a_copy_stripped_of_its_tensors_has_no_weight():
    """(QuantizedLayer keeps such a copy; torch.func probes it with hasattr.)"""
    layer = next(c for c in CASES if c.id == "factorize/Linear").build().layer
    assert isinstance(layer.weight, DenseWeight)
    for name, _ in list(layer.named_parameters()):
        del layer._parameters[name]
    assert not hasattr(layer, "weight")


def test_a_layer_without_to_dense_gives_metadata_and_a_clear_error_on_values():
    w = _NoDense().weight
    assert w.shape == (2, 3) and w.dtype == torch.float64
    with pytest.raises(NotImplementedError, match="implements no to_dense"):
        w.sum()


# ----------------------------------------------------------------- Hugging Face T5


def _t5(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.T5Config(
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=16,
        vocab_size=100,
        decoder_start_token_id=0,  # (T5's own; generate() needs it)
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


T5_PARAMS = {"factorize": {"rank": 8}, "tt": {"ranks": 4, "d": 2}, "qat": {"bits": 8}}


@pytest.mark.parametrize("transform", sorted(T5_PARAMS))
def test_a_factorized_t5_runs_generates_saves_and_loads(transform, tmp_path):
    model = _t5(0)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    sample = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": ids[:, :4],
    }
    spec = {
        "version": 1,
        "rules": [
            {
                "match": ["**.DenseReluDense.wi", "**.DenseReluDense.wo"],
                "transform": transform,
                "params": T5_PARAMS[transform],
            }
        ],
    }
    small = surgery.apply(model, spec, sample)
    ffns = [m for n, m in small.named_modules() if n.endswith("DenseReluDense")]
    assert len(ffns) == 2
    for ffn in ffns:  # both replaced, and T5 reads wo.weight.dtype at every forward
        assert isinstance(ffn.wi, SurgeryLayer) and isinstance(ffn.wo, SurgeryLayer)
        assert ffn.wo.weight.dtype == torch.float32

    def run(m):
        with torch.no_grad():
            logits = m(**sample).logits
            tokens = m.generate(
                input_ids=ids, attention_mask=sample["attention_mask"], max_new_tokens=3
            )
        return logits, tokens

    logits, tokens = run(small)
    assert logits.shape == (2, 4, 100) and torch.isfinite(logits).all()
    assert tokens.shape[0] == 2 and 2 <= tokens.shape[1] <= 4

    path = tnsurgery.save(small, tmp_path / "t5")
    loaded = tnsurgery.load(path, _t5(1))
    for ffn in (m for n, m in loaded.named_modules() if n.endswith("DenseReluDense")):
        assert type(ffn.wo) is type(ffns[0].wo)
    loaded_logits, loaded_tokens = run(loaded)
    torch.testing.assert_close(loaded_logits, logits, rtol=0, atol=0)
    assert torch.equal(loaded_tokens, tokens)

    with torch.no_grad():  # another dtype: the weight follows, T5's cast agrees
        double = loaded.double()(**sample).logits
    assert double.dtype == torch.float64
    _close(double.float(), logits, 1e-4)
