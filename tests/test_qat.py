"""The ``qat`` transform, quantization arithmetic, and export (``surgery.convert``)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.errors import SpecError, SurgeryError, UserInputError
from tnsurgery.layers.cp import CPConv2d
from tnsurgery.layers.lowrank import LowRankConv2d, LowRankLinear
from tnsurgery.layers.qat import QATLayer, QuantizedLayer
from tnsurgery.layers.tt import TTLinear
from tnsurgery.layers.tucker import TuckerConv2d, TuckerLinear
from tnsurgery.quant import (
    FakeQuantizer,
    dequantize,
    fake_quantize,
    lsq_fake_quantize,
    observed_range,
    pack_bits,
    packed_bytes,
    qrange,
    quantize,
    scale_zero_point,
    set_fake_quant,
    set_observers,
    unpack_bits,
)

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models

BITS = (2, 3, 4, 5, 6, 7, 8)
SCHEMES = ("symmetric", "asymmetric")


# --------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_round_trip_error_is_at_most_half_a_step(bits, scheme, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 9, generator=g) * torch.linspace(0.1, 3, 9) + 0.3
    lo, hi = observed_range(x, axis)
    scale, zp = scale_zero_point(lo, hi, bits, scheme)
    qmin, qmax = qrange(bits, scheme)
    q = quantize(x, scale, zp, bits, scheme, axis)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert q.dtype == (torch.int8 if scheme == "symmetric" else torch.uint8)
    dq = dequantize(q, scale, zp, axis)
    # every observed value lies inside the grid: error <= half a step (its own channel's)
    step = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(2)])
    assert torch.all((dq - x).abs() <= step / 2 + 1e-6)
    # the fused fake-quant op lands on exactly the same values
    assert torch.equal(fake_quantize(x, scale, zp, bits, scheme, axis), dq)
    # and the grid spends all its levels: the range's ends are (nearly) hit
    assert (dq.max() - x.max()).abs() <= scale.max() / 2 + 1e-6


def test_schemes_ranges_and_zero_points():
    assert qrange(8, "symmetric") == (-127, 127) and qrange(4, "asymmetric") == (0, 15)
    with pytest.raises(ValueError):
        qrange(9, "symmetric")
    scale, zp = scale_zero_point(torch.tensor([0.0]), torch.tensor([2.55]), 8, "asymmetric")
    assert float(scale) == pytest.approx(0.01) and int(zp) == 0
    scale, zp = scale_zero_point(torch.tensor([-1.0]), torch.tensor([3.0]), 4, "asymmetric")
    assert float(scale) == pytest.approx(4 / 15) and int(zp) == 4  # 0.0 is exact
    x = torch.tensor([0.0])
    assert float(dequantize(quantize(x, scale, zp, 4, "asymmetric", None), scale, zp, None)) == 0
    # halving the bits roughly multiplies the error by 2^(halved bits)
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    errs = {}
    for bits in (8, 4):
        s, z = scale_zero_point(*observed_range(w, 0), bits, "symmetric")
        errs[bits] = float((fake_quantize(w, s, z, bits, "symmetric", 0) - w).norm() / w.norm())
    assert errs[8] < 0.01 and 0.05 < errs[4] < 0.2 and errs[4] / errs[8] > 10


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trips_at_bits_per_value(bits):
    for scheme in SCHEMES:
        qmin, qmax = qrange(bits, scheme)
        g = torch.Generator().manual_seed(bits)
        q = torch.randint(qmin, qmax + 1, (7, 13), generator=g)
        dtype = torch.int8 if scheme == "symmetric" else torch.uint8
        q = q.to(dtype)
        packed = pack_bits(q, bits, qmin)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_bytes(q.numel(), bits) == -(-91 * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, qmin, (7, 13), dtype), q)


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.26, 0.9, 5.0], requires_grad=True)
    scale, zp = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    fake_quantize(x, scale, zp, 4, "symmetric", None).sum().backward()  # range ±0.7
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_gradient_reaches_the_scale_and_matches_the_fixed_grid_forward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    scale = torch.full((16,), 0.05, requires_grad=True)
    zp = torch.zeros(16, dtype=torch.int32)
    y = lsq_fake_quantize(x, scale, zp, 4, "symmetric", 0)
    assert torch.allclose(y, fake_quantize(x, scale.detach(), zp, 4, "symmetric", 0), atol=1e-6)
    (y - x.detach() * 1.5).square().sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_observers_minmax_and_ema_and_freezing():
    w = FakeQuantizer(8, "symmetric", 0, 3, "minmax", is_weight=True)
    w.train()
    w(torch.ones(3, 4))
    w(torch.full((3, 4), 0.5))
    assert torch.allclose(w.max_val, torch.full((3,), 0.5))  # weights: the current range
    a = FakeQuantizer(8, "asymmetric", observer="minmax", is_weight=False).train()
    a(torch.tensor([0.0, 1.0]))
    a(torch.tensor([-2.0, 0.5]))
    assert float(a.min_val) == -2.0 and float(a.max_val) == 1.0  # inputs: running range
    e = FakeQuantizer(8, "asymmetric", observer="ema", is_weight=False, momentum=0.5).train()
    e(torch.tensor([0.0, 2.0]))
    e(torch.tensor([0.0, 4.0]))
    assert float(e.max_val) == pytest.approx(3.0)
    set_observers(e, False)
    e(torch.tensor([0.0, 100.0]))
    assert float(e.max_val) == pytest.approx(3.0)
    e.eval()
    set_observers(e, True)
    e(torch.tensor([0.0, 100.0]))  # eval mode: observed already, so frozen
    assert float(e.max_val) == pytest.approx(3.0)


# ------------------------------------------------------------ tensor layers


def _made(module: nn.Module, transform: str, params: dict) -> nn.Module:
    spec = {"rules": [{"match": "0", "transform": transform, "params": params}]}
    return surgery.apply(nn.Sequential(module), spec)[0]


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    lin, conv = nn.Linear(24, 20), nn.Conv2d(6, 8, 3, padding=1)
    layers = {
        "linear": lin,
        "conv": conv,
        "lowrank_linear": _made(lin, "factorize", {"rank": 5}),
        "lowrank_conv": _made(conv, "factorize", {"rank": 4}),
        "tt": _made(lin, "tt", {"ranks": 3, "in_factors": [2, 3, 4], "out_factors": [2, 2, 5]}),
        "tucker_linear": _made(lin, "tucker", {"ranks": [3, 4, 3, 4], "d": 2}),
        "tucker_conv": _made(conv, "tucker", {"ranks": [5, 4]}),
        "cp": _made(conv, "cp", {"rank": 5}),
    }
    types = (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d, TTLinear, TuckerLinear)
    assert all(isinstance(m, (*types, TuckerConv2d, CPConv2d)) for m in layers.values())
    return layers


EXPECTED_AXES = {
    "linear": {"weight": 0},
    "conv": {"weight": 0},
    "lowrank_linear": {"v": 0, "u": 0},
    "lowrank_conv": {"first.weight": 0, "second.weight": 0},
    "tt": {"cores.0": 3, "cores.1": 3, "cores.2": 0},
    "tucker_linear": {"core": 0, "out_proj.0": 1, "out_proj.1": 1, "in_proj.0": 1, "in_proj.1": 1},
    "tucker_conv": {"first.weight": 0, "core.weight": 0, "last.weight": 0},
    "cp": {
        "first.weight": 0,
        "vertical.weight": 0,
        "horizontal.weight": 0,
        "last.weight": 0,
    },
}


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if "conv" in name or name == "cp":
        return torch.randn(2, 6, 5, 5, generator=g)
    return torch.randn(7, 24, generator=g)


@pytest.mark.parametrize("name", list(EXPECTED_AXES))
def test_every_tensor_of_every_layer_gets_its_own_quantizer(name):
    inner = _layers()[name]
    q = QATLayer(inner, bits=4)
    assert q.axes == EXPECTED_AXES[name]
    params = dict(inner.named_parameters())
    for pname, axis in EXPECTED_AXES[name].items():
        fq = q.weight_quantizers[pname.replace(".", "__")]
        assert fq.axis == axis and fq.scale.numel() == params[pname].shape[axis]
    per_tensor = QATLayer(_layers()[name], bits=4, granularity="per_tensor")
    assert all(fq.axis is None for fq in per_tensor.weight_quantizers.values())


@pytest.mark.parametrize("name", list(EXPECTED_AXES))
def test_disabled_wrapper_is_exactly_the_layer_and_enabled_one_quantizes(name):
    inner = _layers()[name]
    x = _input(name)
    ref = inner(x)
    q = QATLayer(inner, bits=4, activations=8).eval()
    q.quant_enabled = False
    assert torch.equal(q(x), ref)
    q.quant_enabled = True
    y = q(x)
    rel = float((y - ref).detach().norm() / ref.detach().norm())
    # 4 bits on products of 2 to 4 factors: lossy (CP's 3-tap factors most), never exact
    assert 1e-4 < rel < 0.6
    # to_dense is the weight the quantized layer computes with
    q = QATLayer(inner, bits=4).eval()
    w = q.to_dense()
    bias = next(p for n, p in inner.named_parameters() if n.endswith("bias"))
    if x.dim() == 4:
        expected = torch.nn.functional.conv2d(x, w, bias, padding=1)
    else:
        expected = torch.nn.functional.linear(x, w, bias)
    assert torch.allclose(q(x), expected, atol=1e-5)
    assert 0 < float((w - _dense(inner)).detach().norm() / _dense(inner).detach().norm()) < 0.6


def _dense(m: nn.Module) -> torch.Tensor:
    return m.weight if isinstance(m, (nn.Linear, nn.Conv2d)) else m.to_dense()


@pytest.mark.parametrize("name", list(EXPECTED_AXES))
def test_gradients_reach_every_tensor_and_learned_scales(name):
    inner = _layers()[name]
    q = QATLayer(inner, bits=4, learn_scale=True, activations=8).train()
    q(_input(name)).square().sum().backward()
    for pname, p in inner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    for fq in q.weight_quantizers.values():
        assert isinstance(fq.scale, nn.Parameter) and fq.scale.grad is not None
    assert q.input_quantizer.scale.grad is not None


def test_switches_reach_every_quantizer():
    m = nn.Sequential(QATLayer(nn.Linear(4, 4), activations=8), QATLayer(nn.Linear(4, 2)))
    assert set_fake_quant(m, False) == 3
    x = torch.randn(3, 4)
    assert torch.equal(m(x), m[1].inner(m[0].inner(x)))


def test_bfloat16_layer():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    q = QATLayer(lin, bits=8)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = q(x).detach()
    ref = lin(x).detach()
    assert y.dtype == torch.bfloat16
    assert 0 < float((y.float() - ref.float()).norm() / ref.float().norm()) < 0.03


# ---------------------------------------------------------------- surgery


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)
    )


def test_factorize_then_qat_on_the_same_names():
    model = _mlp()
    x = torch.randn(8, 64)
    spec = {
        "rules": [
            {"match": "[02]", "transform": "factorize", "params": {"rank": 8}},
            {"match": "*", "transform": "qat", "params": {"bits": 4}},
        ]
    }
    p = surgery.plan(model, spec, x)
    qat = [t for t in p.targets if t.transform == "qat"]
    assert [t.module_type for t in qat] == ["LowRankLinear", "LowRankLinear", "Linear"]
    assert all(t.predicted_error and t.predicted_error < 0.3 for t in qat)
    out = surgery.apply(model, spec, x)
    assert isinstance(out[0], QATLayer) and isinstance(out[0].inner, LowRankLinear)
    assert isinstance(out[4], QATLayer) and isinstance(out[4].inner, nn.Linear)
    # predicted error equals what surgery measured
    for t in surgery.get_manifest(out)["replacements"]:
        assert t["weight_error"] == pytest.approx(t["predicted_error"], rel=1e-5)
    # bytes: 4-bit weights + per-channel scales, bias in float
    tot = p.totals()
    lin = model[4]
    assert qat[2].bytes_before == 4 * (48 * 10 + 10)
    assert qat[2].bytes_after == 48 * 10 // 2 + 10 * 8 + 10 * 4
    assert tot["model_bytes_before"] == 4 * sum(p.numel() for p in model.parameters())
    assert tot["model_bytes_after"] < tot["model_bytes_before"] / 4
    assert lin.weight.shape == (10, 48)


def test_qat_twice_is_skipped_and_bad_params_name_the_field():
    model = surgery.apply(_mlp(), {"rules": [{"match": "*", "transform": "qat"}]})
    p = surgery.plan(model, {"rules": [{"match": "*", "transform": "qat"}]})
    assert {t.status for t in p.targets} == {"skip"}
    assert all("already quantized" in t.reason for t in p.targets)
    with pytest.raises(SpecError) as info:
        surgery.plan(_mlp(), {"rules": [{"match": "*", "transform": "qat", "params": {"bits": 9}}]})
    assert "bits" in str(info.value)
    with pytest.raises(SpecError) as info:
        surgery.plan(
            _mlp(), {"rules": [{"match": "*", "transform": "qat", "params": {"schema": "x"}}]}
        )
    assert "scheme" in str(info.value)  # the closest valid name


def test_qat_training_lowers_the_loss():
    torch.manual_seed(0)
    teacher = _mlp(1).eval()
    model = surgery.apply(
        _mlp(2), {"rules": [{"match": "*", "transform": "qat", "params": {"bits": 4}}]}
    )
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(256, 64)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------- export


def _tensor_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 60),
        nn.ReLU(),
        nn.Linear(60, 10),
    ).eval()


TENSOR_SPEC = {
    "rules": [
        {"match": "0", "transform": "cp", "params": {"rank": 8}},
        {"match": "2", "transform": "tucker", "params": {"ranks": [8, 8]}},
        {"match": "5", "transform": "tt", "params": {"ranks": 4}},
        {"match": "7", "transform": "tucker", "params": {"ranks": [4, 4, 4, 4], "d": 2}},
        {"match": "9", "transform": "factorize", "params": {"rank": 4}},
        {"match": "*", "transform": "qat", "params": {"bits": 4, "activations": 8}},
    ]
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_matches_fake_quant_and_round_trips_through_save_load(tmp_path, scheme):
    x = torch.randn(4, 3, 8, 8)
    spec = copy.deepcopy(TENSOR_SPEC)
    spec["rules"][-1]["params"]["scheme"] = scheme
    fq = surgery.apply(_tensor_model(), spec, x)
    fq.train()
    fq(x)  # a training step's observation, as after QAT
    fq.eval()
    exported = surgery.convert(fq, x)
    assert all(isinstance(exported[i], QuantizedLayer) for i in (0, 2, 5, 7, 9))
    assert isinstance(fq[0], QATLayer)  # convert copies by default
    with torch.no_grad():
        assert torch.allclose(exported(x), fq(x), atol=1e-6)
    manifest = surgery.get_manifest(exported)
    assert manifest["operation"] == "convert" and manifest["output_error"] < 1e-6
    assert manifest["model_bytes_after"] < manifest["model_bytes_before"] / 3
    for rec in manifest["replacements"]:
        assert rec["weight_error"] < 1e-6 and rec["bytes_after"] < rec["bytes_before"]
    # integer storage: packed 4-bit values, in uint8
    assert exported[5].cores__0_q.dtype == torch.uint8
    assert exported[5].cores__0_q.numel() == packed_bytes(fq[5].inner.cores[0].numel(), 4)
    tnsurgery.save(exported, tmp_path / "out")
    loaded = tnsurgery.load(tmp_path / "out", _tensor_model()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
    assert all(isinstance(loaded[i], QuantizedLayer) for i in (0, 2, 5, 7, 9))
    # the fake-quant model round-trips too (observers' state included)
    tnsurgery.save(fq, tmp_path / "fq")
    again = tnsurgery.load(tmp_path / "fq", _tensor_model()).eval()
    with torch.no_grad():
        assert torch.equal(again(x), fq(x))


def test_exported_file_shrinks_on_disk(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    sizes = {}
    for bits in (8, 4, 2):
        spec = {"rules": [{"match": "*", "transform": "qat", "params": {"bits": bits}}]}
        fq = surgery.apply(model, spec)
        tnsurgery.save(fq, tmp_path / f"fq{bits}")
        tnsurgery.save(surgery.convert(fq), tmp_path / f"int{bits}")
        sizes[bits] = os.path.getsize(tmp_path / f"int{bits}" / "model.safetensors")
        sizes[f"fq{bits}"] = os.path.getsize(tmp_path / f"fq{bits}" / "model.safetensors")
    dense = 4 * sum(p.numel() for p in model.parameters())
    assert sizes["fq8"] > dense  # fake quant stores float weights (and quantizer state)
    assert sizes[8] < 0.3 * dense
    assert sizes[4] < 0.6 * sizes[8]
    assert sizes[2] < 0.6 * sizes[4]


def test_convert_refuses_a_model_without_qat_and_rolls_back_on_failure(monkeypatch):
    with pytest.raises(UserInputError, match="no QAT layer"):
        surgery.convert(_mlp())
    fq = surgery.apply(_mlp(), {"rules": [{"match": "*", "transform": "qat"}]})
    real = QuantizedLayer.from_qat
    calls = []

    def flaky(layer):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(layer)

    monkeypatch.setattr(QuantizedLayer, "from_qat", staticmethod(flaky))
    with pytest.raises(SurgeryError, match="failed to export 2: RuntimeError: boom"):
        surgery.convert(fq, inplace=True)
    assert all(isinstance(fq[i], QATLayer) for i in (0, 2, 4))


def test_exported_layer_state_is_integers_scales_and_floats_only():
    fq = surgery.apply(
        _mlp(), {"rules": [{"match": "0", "transform": "qat", "params": {"bits": 3}}]}
    )
    exported = surgery.convert(fq)
    state = exported[0].state_dict()
    assert set(state) == {"weight_q", "weight_scale", "weight_zero_point", "float_params.bias"}
    assert state["weight_q"].numel() == packed_bytes(96 * 64, 3)
    assert exported[0].param_count() == 96 * 64 + 96
    assert exported[0].flops((5, 64)) == 2 * 5 * 64 * 96


def test_shipped_example_spec_on_a_conv_net():
    spec = Path(__file__).resolve().parents[1] / "specs" / "cnn_factorize_qat.json"
    model = models.cnn()
    x = torch.randn(2, 3, 16, 16)
    out = surgery.apply(model, spec, x)
    assert isinstance(out.conv1, QATLayer) and isinstance(out.conv1.inner, nn.Conv2d)
    assert isinstance(out.conv2, QATLayer) and isinstance(out.conv2.inner, LowRankConv2d)
    assert isinstance(out.fc, QATLayer)
    exported = surgery.convert(out, x)
    assert surgery.get_manifest(exported)["output_error"] < 1e-6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_learned_scales_export_bit_exactly(scheme):
    torch.manual_seed(0)
    layer = QATLayer(nn.Linear(64, 32), bits=3, scheme=scheme, learn_scale=True, activations=6)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 64)
    for _ in range(5):
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    exported = QuantizedLayer.from_qat(layer)
    with torch.no_grad():
        assert torch.equal(exported.to_dense(), layer.to_dense())
        assert torch.equal(exported(x), layer(x))


def test_saved_manifest_metadata_is_compact_and_plan_not_duplicated(tmp_path):
    from safetensors import safe_open

    fq = surgery.apply(_mlp(), {"rules": [{"match": "*", "transform": "qat"}]})
    exported = surgery.convert(fq)
    tnsurgery.save(exported, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        text = f.metadata()["tnsurgery_manifest"]
    assert "\n" not in text and '": ' not in text
    manifest = surgery.get_manifest(exported)
    assert manifest["plan"] is None and manifest["history"][0]["plan"] is not None


def test_qat_over_tt_is_never_served_from_a_stale_cache():
    torch.manual_seed(0)
    layer = _layers()["tt"]
    q = QATLayer(layer, bits=8).eval()
    x = torch.randn(64, 24)
    outs = []
    for k in range(5):
        with torch.no_grad():
            layer.cores[0].mul_(1.5)
            q.weight_quantizers["cores__0"].observe(layer.cores[0])
            outs.append(q(x))
            ref = x @ q.to_dense().T + layer.bias
        assert torch.allclose(outs[-1], ref, atol=1e-5), k


def test_exported_bfloat16_model_runs_in_bfloat16():
    model = _mlp().to(torch.bfloat16)
    fq = surgery.apply(
        model, {"rules": [{"match": "*", "transform": "qat", "params": {"bits": 8}}]}
    )
    exported = surgery.convert(fq)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = exported(x)
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), fq(x).float(), atol=1e-2)


def test_convert_refuses_an_input_quantizer_that_saw_no_input():
    fq = surgery.apply(
        _mlp(), {"rules": [{"match": "0", "transform": "qat", "params": {"activations": 8}}]}
    )
    with pytest.raises(UserInputError, match="never seen an input"):
        surgery.convert(fq)
    x = torch.randn(4, 64)
    exported = surgery.convert(fq, x)  # the sample input gives it a scale
    with torch.no_grad():
        assert torch.allclose(exported(x), fq.eval()(x), atol=1e-6)


def test_onnx_export_of_a_qat_model_says_to_convert_it_first(tmp_path):
    """Fake quantization has no ONNX form: the export names the fix (convert first),
    and the converted model exports and computes what the QAT model computed."""
    pytest.importorskip("onnx")
    import warnings

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    spec = {
        "version": 1,
        "rules": [{"match": "**", "types": ["Linear"], "transform": "qat", "params": {"bits": 4}}],
    }
    x = torch.randn(2, 8)
    qat = tnsurgery.apply(model, spec, x).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tnsurgery.UserInputError, match=r"convert it first.*tnsurgery\.convert"):
            torch.onnx.export(qat, (x,), str(tmp_path / "q.onnx"), dynamo=False)
        with pytest.raises(Exception, match=r"convert it first"):  # (wrapped by torch.export)
            torch.onnx.export(qat, (x,), str(tmp_path / "q2.onnx"), dynamo=True)
        converted = tnsurgery.convert(qat)
        for dynamo in (False, True):  # (4-bit unpacking: no shift, which dynamo lacks)
            torch.onnx.export(converted, (x,), str(tmp_path / f"c{dynamo}.onnx"), dynamo=dynamo)
    import onnx
    from onnx.reference import ReferenceEvaluator

    for dynamo in (False, True):
        graph = onnx.load(str(tmp_path / f"c{dynamo}.onnx"))
        (got,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), qat(x), rtol=1e-4, atol=1e-4)
