"""One battery for every layer class of every registered transform, built-in or plugin.

The cases are made the way surgery makes layers: a seeded ``nn.Linear`` or
``nn.Conv2d`` goes through a registered transform's ``plan`` and ``build``
(``qat`` also wraps layers other transforms made, and its layers are exported to
``QuantizedLayer``). Each case then goes through the same checks:

- forward against the dense op it replaces, computed with ``to_dense()``;
- gradients reach every parameter;
- ``from_config(config())`` plus ``load_state_dict`` computes the same outputs
  (the config JSON-compatible, the state loadable with ``weights_only``);
- pickle round trip;
- ``torch.compile`` (graph capture and AOT autograd only: ``aot_eager``), in one
  graph except for the layers in :data:`GRAPH_BREAKS` (the slowest check, about
  half the battery's time: ``-k "not compile"`` leaves it out);
- ONNX export (TorchScript exporter), run by ONNX's reference evaluator,
  except the layers in :data:`ONNX_UNSUPPORTED`;
- dtype and device moves (``.double()``, ``.to(float64)``, the meta device,
  CUDA when there is one): outputs follow (on the meta device, except for the
  layers in :data:`META_UNSUPPORTED`);
- the training hooks of the contract (progressive rank, TT hygiene) keep the
  weight where they promise to.

:func:`test_every_registered_layer_class_has_a_case` fails when a transform,
a module type it accepts, or a layer class it registers has no case: add its
params to :data:`PARAMS`.

The layers a registered split (``register_splits``) puts in place of a fused module
(``nn.MultiheadAttention`` -> ``SplitMultiheadAttention``) have no dense op of their
own: they go through the same checks against the fused module they replace
(:data:`SPLIT_SOURCES`), outputs and attention weights alike.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.qat import QATLayer, QuantizedLayer
from tnsurgery.plugins import get_registry, qualified_name
from tnsurgery.transform import Context

# The params each transform is tested with, per source: "Linear" and "Conv2d" are
# seeded dense modules, "<transform>/<source>" the layer that transform made from
# that source (for transforms that accept SurgeryLayers, e.g. qat).
PARAMS: dict[str, dict[str, dict]] = {
    "factorize": {"Linear": {"rank": 5}, "Conv2d": {"rank": 4}, "Conv1D": {"rank": 5}},
    "tt": {
        "Linear": {"ranks": 3, "in_factors": [2, 3, 4], "out_factors": [2, 2, 5]},
        "Conv1D": {"ranks": 3, "in_factors": [2, 3, 4], "out_factors": [2, 2, 5]},
    },
    "cp": {"Conv2d": {"rank": 5}},
    "tucker": {"Linear": {"ranks": [3, 4, 3, 4], "d": 2}, "Conv2d": {"ranks": [5, 4]}},
    "qat": {
        "Linear": {"bits": 4},
        "Conv1D": {"bits": 4, "activations": 8, "scheme": "asymmetric"},
        "Conv2d": {"bits": 4, "activations": 8, "scheme": "asymmetric"},
        "factorize/Linear": {"bits": 6, "granularity": "per_tensor"},
        "tt/Linear": {"bits": 4, "learn_scale": True},
    },
    "prune": {"Linear": {"sparsity": 0.5}, "Conv2d": {"sparsity": 0.4, "scope": "row"}},
}

# Layers whose ONNX export may fail (an expected failure), with the reason; the
# others must export and compute what they compute in eager mode.
ONNX_UNSUPPORTED = {
    "tnsurgery.layers.qat.QATLayer": "a training-time layer: fake quantization below 8 bits "
    "(torch.fake_quantize_per_*_affine) has no ONNX form (QuantizeLinear takes 8-bit ranges "
    "only), and an input quantizer that has seen no input observes inside the trace; "
    "export the converted QuantizedLayer",
}

# Layers that torch.compile may not capture in one graph (they still compile, with
# graph breaks, and must compute what they compute in eager mode).
GRAPH_BREAKS = {
    "tnsurgery.layers.qat.QATLayer": "its switches (quant_enabled, the quantizers' flags) "
    "are tensors read with bool(): data-dependent branches",
    "tnsurgery.layers.qat.QuantizedLayer": "with an input quantizer: its flags are tensors "
    "read with bool(), as in QATLayer",
}

# Layers that may not run on the meta device (the check still moves them there).
META_UNSUPPORTED = {
    "tnsurgery.layers.qat.QATLayer": "reads its switches (quant_enabled, each quantizer's "
    "observe and fake-quantize flags) from tensors with bool(): a meta tensor has no value",
    "tnsurgery.layers.qat.QuantizedLayer": "with an input quantizer: its observe flag is "
    "read from a tensor, as in QATLayer",
}

INPUT_SHAPES = {"Linear": (2, 3, 24), "Conv2d": (2, 6, 7, 5), "Conv1D": (2, 3, 24)}


def _self_attention() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    return nn.MultiheadAttention(24, 4, batch_first=True), (x, x, x)


def _cross_attention() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 2, 24, generator=gen), torch.randn(7, 2, 10, generator=gen)
    v = torch.randn(7, 2, 12, generator=gen)
    mha = nn.MultiheadAttention(24, 4, bias=False, add_bias_kv=True, kdim=10, vdim=12)
    nn.init.normal_(mha.bias_k)
    nn.init.normal_(mha.bias_v)
    return mha, (q, k, v)


# The fused modules each registered split is tested on (seeded; with the positional
# inputs of their forward), by split name: two cases when a split has options.
SPLIT_SOURCES: dict[str, dict[str, Callable[[], tuple[nn.Module, tuple]]]] = {
    "multihead_attention": {"self": _self_attention, "cross_kdim_vdim_bias_kv": _cross_attention},
}


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2), as transformers writes it (which is optional
    here): a Linear whose weight is stored ``(in, out)``; transforms know it by name."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx**-0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def _dense_source(kind: str) -> nn.Module:
    """The seeded dense module every case starts from: a Linear with a bias, a strided
    Conv2d without one (both branches of every layer's bias handling get run)."""
    torch.manual_seed(0)
    if kind == "Linear":
        return nn.Linear(24, 20)
    if kind == "Conv1D":
        return Conv1D(20, 24)
    return nn.Conv2d(6, 8, 3, stride=(2, 1), padding=1, bias=False)


def _apply(transform: str, module: nn.Module, params: dict, input_shape) -> nn.Module:
    """Plan and build ``transform`` on ``module``, as the surgery pipeline does."""
    t = get_registry().get(transform)
    p = t.params_model.model_validate(params)
    decision = None
    if t.plan is not None:
        decision = t.plan(module, p, Context(name="x", input_shape=input_shape))
        assert not decision.skip_reason, f"{transform}: {decision.skip_reason}"
    return t.build(module, p, Context(name="x", input_shape=input_shape, decision=decision))


@dataclass
class Built:
    """One case's layer, the dense module its chain started from (a copy taken before
    any transform ran: the reference for the dense op), and the module that was at the
    layer's place before it (what ``from_config`` gets as ``current``)."""

    layer: nn.Module
    dense: nn.Module
    before: nn.Module | None


def _make(source: str) -> Built:
    """The module ``source`` names: a dense kind, or ``<transform>/<source>``."""
    if "/" not in source:
        module = _dense_source(source)
        return Built(module, copy.deepcopy(module), None)
    transform, _, inner = source.partition("/")
    below = _make(inner)
    kind = inner.rsplit("/", 1)[-1]
    params = PARAMS[transform][inner]
    before = copy.deepcopy(below.layer)
    layer = _apply(transform, below.layer, params, INPUT_SHAPES[kind])
    return Built(layer, below.dense, before)


def _exported(source: str) -> Built:
    """A ``qat`` case's layer exported to integers (what ``tnsurgery export`` stores)."""
    built = _make(source)
    qat = built.layer
    assert isinstance(qat, QATLayer)
    with torch.no_grad():  # the input quantizer, if any, observes a first input
        qat.eval()(_input(source.rsplit("/", 1)[-1]))
    return Built(QuantizedLayer.from_qat(qat), built.dense, built.before)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "Linear" or "Conv2d": the dense op the layer computes
    build: Callable[[], Built]


def _cases() -> list[Case]:
    registered = get_registry().transforms  # (a plugin not installed: no case)
    cases = []
    for transform, by_source in PARAMS.items():
        if transform not in registered:
            continue
        for source in by_source:
            kind = source.rsplit("/", 1)[-1]
            name = f"{transform}/{source}"
            cases.append(Case(name, kind, lambda n=name: _make(n)))
            if transform == "qat":
                cases.append(Case(f"export/{name}", kind, lambda n=name: _exported(n)))
    return cases


CASES = _cases()
CASE_IDS = [c.id for c in CASES]


def _input(kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(INPUT_SHAPES[kind], generator=gen).to(dtype)


@pytest.fixture(params=CASES, ids=CASE_IDS, name="case")
def case_fixture(request) -> Case:
    return request.param


def _dense_op(built: Built, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The op the layer replaces, with the layer's ``to_dense()`` weight (and the
    original bias); a layer that quantizes its input gives the op that input."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        x = quantizer(x)
    weight = layer.to_dense()  # a Linear's (out, in): a Conv1D stores its transpose
    weight = weight.mT if isinstance(built.dense, Conv1D) else weight
    return functional_call(built.dense, {"weight": weight, "bias": built.dense.bias}, x)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = float(b.detach().abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1.0))


# --------------------------------------------------------------------------- coverage


def test_every_registered_layer_class_has_a_case():
    registry = get_registry()
    missing = [n for n in registry.transforms if n not in PARAMS]
    assert not missing, (
        f"transforms without a battery case: {missing}; add their params to PARAMS in {__file__}"
    )
    for name, t in registry.transforms.items():
        sources = [_make(s).layer for s in PARAMS[name]]
        for module_type in t.module_types:  # a Linear, a Conv2d, a layer another transform made
            assert any(isinstance(m, module_type) for m in sources), (
                f"transform '{name}' accepts {module_type.__name__} but no source in "
                f"PARAMS['{name}'] is one: add a case in {__file__}"
            )
    missing = [n for n in registry.splits if n not in SPLIT_SOURCES]
    assert not missing, f"splits without a battery case: {missing}; add to SPLIT_SOURCES"
    built = {qualified_name(type(c.build().layer)) for c in CASES}
    built |= {qualified_name(type(_split(c)[1])) for c in SPLIT_CASES}
    uncovered = sorted(set(registry.layer_classes()) - built)
    assert not uncovered, (
        f"registered layer classes no battery case builds: {uncovered}; add a case "
        f"(params in PARAMS) in {__file__}"
    )
    listed = {*ONNX_UNSUPPORTED, *GRAPH_BREAKS, *META_UNSUPPORTED}
    assert listed <= set(registry.layer_classes()), "an expected failure of no layer class"


# --------------------------------------------------------------------------- battery


def test_forward_matches_the_dense_op(case):
    built = case.build()
    layer, x = built.layer, _input(case.kind)
    layer.train()
    _close(layer(x), _dense_op(built, layer, x))  # training: weights rebuilt each call
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        _close(first, _dense_op(built, layer, x))
        _same(layer(x), first)  # inference: cached weights give the same result


def test_gradients_reach_every_parameter(case):
    layer, x = case.build().layer.train(), _input(case.kind).requires_grad_(True)
    layer(x).square().sum().backward()
    # (an exported layer without bias has no parameter: its weights are integers)
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_from_config_round_trip(case):
    built = case.build()
    layer, x = built.layer.eval(), _input(case.kind)
    config = layer.config()
    assert json.loads(json.dumps(config)) == config, "config() is not JSON-compatible"
    rebuilt = type(layer).from_config(json.loads(json.dumps(config)), built.before)
    assert type(rebuilt) is type(layer) and rebuilt.config() == config
    state = layer.state_dict()
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == shapes
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    rebuilt.eval()
    with torch.no_grad():
        _same(rebuilt(x), layer(x))
    assert rebuilt.param_count() == layer.param_count()
    assert rebuilt.flops(tuple(x.shape)) == layer.flops(tuple(x.shape))


def test_from_config_builds_on_the_meta_device_with_the_same_shapes(case):
    """tnsurgery.load builds every recorded layer on the meta device first, to check
    its config against the weights file before allocating anything."""
    built = case.build()
    layer = built.layer
    config = json.loads(json.dumps(layer.config()))
    with torch.device("meta"):
        probe = type(layer).from_config(config, built.before)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in probe.state_dict().items()} == shapes


def test_pickle_round_trip(case):
    layer, x = case.build().layer.eval(), _input(case.kind)
    with torch.no_grad():
        y = layer(x)  # fills the inference caches: never pickled
    for loaded in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert type(loaded) is type(layer) and loaded.config() == layer.config()
        with torch.no_grad():
            _same(loaded(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    with torch.no_grad():
        _same(torch.load(buf, weights_only=False)(x), y)


def test_torch_compile(case):
    torch._dynamo.reset()
    layer, x = case.build().layer.eval(), _input(case.kind).requires_grad_(True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    try:
        y = compiled(x)  # with gradients: the backward is captured too
    except Exception:
        if qualified_name(type(layer)) not in GRAPH_BREAKS:
            raise
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager")
        y = compiled(x)
    _close(y, layer(x))
    y.square().sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    with torch.no_grad():
        _close(compiled(x), layer(x))


def test_onnx_export(case, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    layer, x = case.build().layer.eval(), _input(case.kind)
    path = tmp_path / "layer.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        try:
            torch.onnx.export(layer, (x,), str(path), dynamo=False)
        except Exception:
            reason = ONNX_UNSUPPORTED.get(qualified_name(type(layer)))
            if reason is None:
                raise
            pytest.xfail(reason)
        expected = layer(x)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (got,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    _close(torch.from_numpy(got), expected, 1e-4)


def test_dtype_moves(case):
    built = case.build()
    layer, x = built.layer.eval(), _input(case.kind)
    with torch.no_grad():
        y = layer(x)
        for move in (lambda m: m.double(), lambda m: m.to(torch.float64)):
            moved = move(copy.deepcopy(layer))
            y64 = moved(x.double())
            assert y64.dtype == torch.float64
            assert moved.to_dense().dtype == torch.float64
            _close(y64.float(), y, 1e-4)
        back = layer.double().float()  # in place, twice: caches follow
        _close(back(x), y, 1e-6)


def test_device_moves(case):
    layer, x = case.build().layer.eval(), _input(case.kind)
    with torch.no_grad():
        y = layer(x)
        meta = copy.deepcopy(layer).to("meta")
        assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
        try:
            out, dense = meta(x.to("meta")), meta.to_dense()
        except (RuntimeError, NotImplementedError):
            if qualified_name(type(layer)) not in META_UNSUPPORTED:
                raise
        else:
            assert out.is_meta and out.shape == y.shape
            assert dense.is_meta
        if torch.cuda.is_available():
            cuda = copy.deepcopy(layer).cuda()
            got = cuda(x.cuda())
            assert got.is_cuda
            _close(got.cpu(), y, 1e-4)
            _close(cuda.cpu()(x), y, 1e-6)


def test_training_hooks_keep_the_weight(case):
    layer, x = case.build().layer, _input(case.kind)
    if not isinstance(layer, SurgeryLayer):
        pytest.skip("not a SurgeryLayer")
    with torch.no_grad():
        w = layer.to_dense().clone()
        layer.balance_norms_()
        _close(layer.to_dense(), w)
        layer.reorthogonalize_()
        _close(layer.to_dense(), w)
        layer.clip_norms_(math.inf)
        _close(layer.to_dense(), w)
        stats = layer.training_stats()
        assert stats is None or json.loads(json.dumps(stats)) == stats
        ranks = layer.cuttable_ranks()
        if ranks is None:
            return
        assert isinstance(ranks, tuple) and all(isinstance(r, int) and r >= 1 for r in ranks)
        layer.cut_ranks_(ranks)  # to the ranks it has: the same weight
        assert layer.cuttable_ranks() == ranks
        _close(layer.to_dense(), w, 1e-4)
        layer.cut_ranks_(tuple(1 for _ in ranks))
        assert layer.cuttable_ranks() == tuple(1 for _ in ranks)
        rebuilt = type(layer).from_config(layer.config())  # config follows the cut
        rebuilt.load_state_dict(layer.state_dict())
        _same(rebuilt.eval()(x), layer.eval()(x))


# --------------------------------------------------------------------------- splits


def _split_cases() -> list[tuple[str, str]]:
    registered = get_registry().splits
    return [(n, c) for n, by_case in SPLIT_SOURCES.items() if n in registered for c in by_case]


SPLIT_CASES = _split_cases()


@pytest.fixture(params=SPLIT_CASES, ids=[f"{n}/{c}" for n, c in SPLIT_CASES], name="split_case")
def split_case_fixture(request) -> tuple[str, str]:
    return request.param


def _split(case: tuple[str, str]) -> tuple[nn.Module, nn.Module, tuple]:
    """The fused module (seeded), its split (by the registered split) and inputs."""
    name, source = case
    torch.manual_seed(0)
    fused, inputs = SPLIT_SOURCES[name][source]()
    split = get_registry().splits[name].split(fused)
    assert split is not None and isinstance(split, get_registry().splits[name].layers)
    return fused, split, inputs


def _same_outputs(a, b, tol: float = 0.0) -> None:
    a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None and tol:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
        elif x is not None:
            _same(x, y)


def test_split_computes_the_fused_module(split_case):
    fused, split, inputs = _split(split_case)
    for part in get_registry().splits[split_case[0]].parts:  # the children rules target
        assert part in split._modules, f"the split has no part {part}"
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in fused.parameters())
    for training in (True, False):
        fused.train(training), split.train(training)
        _same_outputs(split(*inputs), fused(*inputs), 1e-6)
    with torch.no_grad():  # (nn.MultiheadAttention's fused fast path, where it has one)
        _same_outputs(split(*inputs), fused(*inputs), 1e-5)


def test_split_gradients_reach_every_parameter(split_case):
    _, split, inputs = _split(split_case)
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    out = split.train()(*inputs)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    for name, p in split.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_split_from_config_round_trip(split_case):
    fused, split, inputs = _split(split_case)
    config = split.eval().config()
    assert json.loads(json.dumps(config)) == config, "config() is not JSON-compatible"
    rebuilt = type(split).from_config(json.loads(json.dumps(config)), fused)
    assert type(rebuilt) is type(split) and rebuilt.config() == config
    buf = io.BytesIO()
    torch.save(split.state_dict(), buf)
    buf.seek(0)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        _same_outputs(rebuilt.eval()(*inputs), split(*inputs))
    with torch.device("meta"):
        probe = type(split).from_config(config, fused)
    shapes = {k: tuple(v.shape) for k, v in split.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in probe.state_dict().items()} == shapes


def test_split_pickle_round_trip(split_case):
    _, split, inputs = _split(split_case)
    with torch.no_grad():
        y = split.eval()(*inputs)
        for loaded in (pickle.loads(pickle.dumps(split)), copy.deepcopy(split)):
            assert type(loaded) is type(split) and loaded.config() == split.config()
            _same_outputs(loaded(*inputs), y)


def test_split_torch_compile(split_case):
    torch._dynamo.reset()
    _, split, inputs = _split(split_case)
    compiled = torch.compile(split.eval(), backend="aot_eager", fullgraph=True)
    _same_outputs(compiled(*inputs), split(*inputs), 1e-5)


def test_split_onnx_export(split_case, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    _, split, inputs = _split(split_case)
    path = tmp_path / "split.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(split.eval(), inputs, str(path), dynamo=False)
        expected = split(*inputs)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    feeds = {i.name: x.numpy() for i, x in zip(model.graph.input, inputs, strict=False)}
    got = ReferenceEvaluator(model).run(None, feeds)
    _same_outputs(tuple(torch.from_numpy(g) for g in got), expected, 1e-4)


def test_split_dtype_and_device_moves(split_case):
    _, split, inputs = _split(split_case)
    with torch.no_grad():
        y = split.eval()(*inputs)
        moved = copy.deepcopy(split).double()
        y64 = tuple(None if t is None else t.double() for t in y)
        _same_outputs(moved(*(x.double() for x in inputs)), y64, 1e-5)
        meta = copy.deepcopy(split).to("meta")
        out = meta(*(x.to("meta") for x in inputs))
        assert out[0].is_meta and out[0].shape == y[0].shape
        if torch.cuda.is_available():
            got = copy.deepcopy(split).cuda()(*(x.cuda() for x in inputs))
            _same_outputs(tuple(t.cpu() for t in got), y, 1e-4)
