"""Hugging Face's ``Conv1D`` (GPT-2's Linear, weight stored ``(in, out)``) as a target of
``factorize``, ``tt`` and ``qat``: recognized without transformers, decomposed as the
Linear it computes (``weight.T``), quantized per output channel (its axis 1), saved,
loaded, exported, and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import tnsurgery
from tnsurgery import io, surgery
from tnsurgery.cli import cli
from tnsurgery.compare import weight_error
from tnsurgery.decompositions.conv1d import (
    Conv1D,
    is_conv1d,
    linear_features,
    linear_weight,
)
from tnsurgery.layers.lowrank import LowRankLinear
from tnsurgery.layers.qat import QATLayer, QuantizedLayer, quant_axes
from tnsurgery.layers.tt import TTLinear
from tnsurgery.plugins import get_registry
from tnsurgery.transform import relative_error

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NAMES = [f"transformer.h.{i}.{b}" for i in range(2) for b in BLOCK]
PARAMS = {"factorize": {"rank": 6}, "tt": {"rank": 2, "d": 2}, "qat": {"bits": 8}}
LAYER = {"factorize": LowRankLinear, "tt": TTLinear, "qat": QATLayer}


class StandIn(nn.Module):
    """transformers' Conv1D code under another class name."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Conv1DCopy(StandIn):
    pass


Conv1DCopy.__name__ = Conv1DCopy.__qualname__ = "Conv1D"  # known by name, as transformers'


# ------------------------------------------------------------ without transformers


def test_conv1d_is_known_by_name_nf_and_weight_without_transformers():
    conv = Conv1DCopy(5, 3)
    assert is_conv1d(conv) and isinstance(conv, Conv1D)
    assert not isinstance(StandIn(5, 3), Conv1D)  # another name
    assert not isinstance(nn.Linear(3, 5), Conv1D)
    conv.nf = 4  # nf does not match the weight's columns
    assert not is_conv1d(conv)
    conv = Conv1DCopy(5, 3)
    assert linear_features(conv) == (3, 5) and linear_features(nn.Linear(3, 5)) == (3, 5)
    assert torch.equal(linear_weight(conv), conv.weight.T)
    lin = nn.Linear(3, 5)
    assert linear_weight(lin) is lin.weight and linear_weight(nn.ReLU()) is None
    with pytest.raises(TypeError):
        Conv1D()
    for name in ("factorize", "tt", "qat"):
        assert Conv1D in get_registry().get(name).module_types


def test_the_transforms_do_not_import_transformers():
    code = (
        "import sys; import tnsurgery.transforms.factorize, tnsurgery.transforms.tt, "
        "tnsurgery.transforms.qat, tnsurgery.layers.qat; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["factorize", "tt", "qat"])
def test_a_conv1d_without_transformers_is_surgered(name):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1DCopy(32, 12), nn.ReLU(), Conv1DCopy(16, 32))
    x = torch.randn(2, 5, 12)
    spec = {
        "rules": [{"match": "*", "types": ["Conv1D"], "transform": name, "params": PARAMS[name]}]
    }
    out = surgery.apply(model, spec, x)
    assert all(isinstance(out[i], LAYER[name]) for i in (0, 2))
    with torch.no_grad():
        assert out(x).shape == model(x).shape


def test_qat_quantizes_a_conv1d_per_output_channel():
    torch.manual_seed(0)
    conv = Conv1DCopy(6, 4)
    assert quant_axes(conv) == {"weight": 1}
    q = QATLayer(conv, bits=4)
    quantizer = q.weight_quantizers["weight"]
    assert quantizer.axis == 1 and quantizer.scale.numel() == 6
    dense = q.to_dense()
    assert dense.shape == (6, 4)  # the (out, in) weight of the Linear it computes
    x = torch.randn(3, 4)
    torch.testing.assert_close(q(x), x @ dense.T + conv.bias)
    # each output channel (a column of the stored weight) on its own grid
    grid = dense.T / quantizer.grid_scale().reshape(1, -1)
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    q.quant_enabled = False
    assert torch.equal(q(x), conv(x))
    exported = QuantizedLayer.from_qat(q.train(False))
    q.quant_enabled = True
    assert torch.equal(exported.to_dense(), q.to_dense())
    torch.testing.assert_close(exported(x), q(x))
    assert exported.flops((3, 4)) == q.flops((3, 4)) == 2 * 3 * 4 * 6


# ------------------------------------------------------------------------- GPT-2


def gpt2(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def ids(seed: int = 1, batch: int = 2, tokens: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (batch, tokens), generator=g)}


def spec_for(name: str, typed: bool = True, params: dict | None = None) -> dict:
    rule = {"match": "transformer.h.**", "transform": name, "params": params or PARAMS[name]}
    if typed:
        rule["types"] = ["Conv1D"]
    return {"version": 1, "rules": [rule]}


def logits(model: nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def layer_inputs(model: nn.Module, x: dict) -> dict[str, torch.Tensor]:
    """The input of every target of the model on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, a[0].detach())
        )
        for n in NAMES
    ]
    try:
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.fixture(scope="module", params=["factorize", "tt", "qat"])
def surgered(request):
    name = request.param
    model = gpt2()
    return name, model, surgery.apply(model, spec_for(name), ids())


@pytest.mark.parametrize("name", ["factorize", "tt", "qat"])
@pytest.mark.parametrize("typed", [True, False], ids=["types-Conv1D", "no-types"])
def test_every_conv1d_of_every_block_is_selected(name, typed):
    model = gpt2()
    plan = surgery.plan(model, spec_for(name, typed), ids())
    assert [t.name for t in plan.replaced()] == NAMES


def test_every_conv1d_is_replaced_and_computes_its_dense_weight(surgered):
    name, model, out = surgered
    x = layer_inputs(model, ids(seed=2))
    targets = {t["name"]: t for t in tnsurgery.get_manifest(out)["plan"]["targets"]}
    assert sorted(targets) == sorted(NAMES)
    for n in NAMES:
        old, new = model.get_submodule(n), out.get_submodule(n)
        assert type(old).__name__ == "Conv1D" and isinstance(new, LAYER[name])
        dense = new.to_dense()
        assert dense.shape == (old.nf, old.weight.shape[0])  # (out, in), as a Linear's
        with torch.no_grad():
            got, ref = new(x[n]), old(x[n])
        torch.testing.assert_close(got, x[n] @ dense.T + old.bias, rtol=1e-5, atol=1e-5)
        # the plan's error is the one of the Linear-equivalent weight ...
        err = relative_error(dense, old.weight.T)
        assert targets[n]["predicted_error"] == pytest.approx(err, rel=1e-5, abs=1e-7)
        assert 0 < err < (0.02 if name == "qat" else 1.0)
        # ... whose difference is all the output differs by: ‖X ΔWᵀ‖ <= ‖X‖ ‖ΔW‖
        gap = float((dense - old.weight.T).detach().norm())
        assert float((got - ref).norm()) <= float(x[n].norm()) * gap * 1.001 + 1e-5


def test_the_recorded_weight_error_is_of_the_linear_equivalent_weight(surgered):
    name, model, out = surgered
    for t in tnsurgery.get_manifest(out)["plan"]["targets"]:
        old, new = model.get_submodule(t["name"]), out.get_submodule(t["name"])
        assert weight_error(old, new) == pytest.approx(relative_error(new.to_dense(), old.weight.T))
        assert t["weight_error"] == pytest.approx(t["predicted_error"], rel=1e-5)


@pytest.mark.parametrize("name", ["factorize", "tt"])
def test_at_the_weights_own_rank_the_layer_is_the_conv1d(name):
    """Weights that are exactly of the decomposition's rank come back to float tolerance
    (a transposition would not: the weights are not symmetric)."""
    model = gpt2()
    # make every Conv1D weight exactly of the rank (TT ranks) the spec asks for
    first = surgery.apply(model, spec_for(name), ids())
    with torch.no_grad():
        for n in NAMES:
            model.get_submodule(n).weight.copy_(first.get_submodule(n).to_dense().T)
    out = surgery.apply(model, spec_for(name), ids())
    x = layer_inputs(model, ids(seed=3))
    for n in NAMES:
        old, new = model.get_submodule(n), out.get_submodule(n)
        with torch.no_grad():
            torch.testing.assert_close(new(x[n]), old(x[n]), rtol=1e-4, atol=1e-5)
        assert relative_error(new.to_dense(), old.weight.T) < 1e-5
    torch.testing.assert_close(
        logits(out, ids(seed=3)), logits(model, ids(seed=3)), rtol=1e-4, atol=1e-4
    )


def test_gradients_flow_through_every_replaced_layer(surgered):
    name, _, out = surgered
    out = out.train()
    x = ids(seed=4)
    try:
        out(**x, labels=x["input_ids"]).loss.backward()
    finally:
        out.eval()
    for n in NAMES:
        params = dict(out.get_submodule(n).named_parameters())
        assert params
        for pname, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}.{pname}"
    out.zero_grad(set_to_none=True)


def test_save_then_load_onto_a_fresh_gpt2_gives_the_same_logits(surgered, tmp_path):
    name, _, out = surgered
    tnsurgery.save(out, tmp_path / "m")
    back = tnsurgery.load(tmp_path / "m", gpt2(seed=7))
    assert all(isinstance(back.get_submodule(n), LAYER[name]) for n in NAMES)
    assert torch.equal(logits(back, ids(seed=5)), logits(out, ids(seed=5)))


@pytest.mark.parametrize(
    "rules",
    [
        [("qat", {"bits": 8})],
        [("factorize", {"rank": 6}), ("qat", {"bits": 4, "activations": 8})],
    ],
    ids=["qat", "factorize-then-qat"],
)
def test_qat_export_on_gpt2_stores_integers_and_loads_back(rules, tmp_path):
    model = gpt2()
    spec = {
        "version": 1,
        "rules": [{"match": "transformer.h.**", "transform": t, "params": p} for t, p in rules],
    }
    qat = surgery.apply(model, spec, ids())
    exported = surgery.convert(qat, ids())
    assert all(isinstance(exported.get_submodule(n), QuantizedLayer) for n in NAMES)
    replacements = tnsurgery.get_manifest(exported)["replacements"]
    converted = [r for r in replacements if r.get("operation") == "convert"]
    assert sorted(r["name"] for r in converted) == sorted(NAMES)
    assert all(r["weight_error"] is not None and r["weight_error"] < 1e-5 for r in converted)
    x = ids(seed=6)
    torch.testing.assert_close(logits(exported, x), logits(qat, x), rtol=1e-4, atol=1e-4)
    tnsurgery.save(exported, tmp_path / "q")
    back = tnsurgery.load(tmp_path / "q", gpt2(seed=7))
    assert torch.equal(logits(back, x), logits(exported, x))


@pytest.mark.parametrize("name", ["factorize", "tt", "qat"])
def test_cli_apply_on_a_saved_gpt2_then_inspect(name, tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "spec.json").write_text(json.dumps(spec_for(name)))
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "apply",
            str(tmp_path / "spec.json"),
            str(tmp_path / "hf"),
            "-o",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["plan"]["totals"]["replaced"] == len(NAMES)
    res = runner.invoke(cli, ["inspect", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert listed["manifest"] is True
    conv1d = {m["name"] for m in listed["modules"] if m["type"] == "Conv1D"}
    # factorize/tt replaced every Conv1D; qat wraps them, a surgered layer listed as one
    # row (its inner Conv1D within it) with the (out, in) shape of the Linear it computes
    assert conv1d == set()
    rows = {m["name"]: m for m in listed["modules"] if m["surgered"]}
    assert set(rows) == set(NAMES)
    for n, row in rows.items():
        fin, fout = model.get_submodule(n).weight.shape  # Conv1D: (in, out)
        assert row["shape"] == [fout, fin], n
    # the block weights changed, are what the file holds, and are what the API makes
    loaded = io.load_model(tmp_path / "out").model
    stored = load_file(tmp_path / "out" / "model.safetensors")
    state = loaded.state_dict()
    block = [k for k in state if k.startswith("transformer.h.")]
    assert set(block) != {k for k in model.state_dict() if k.startswith("transformer.h.")}
    assert all(torch.equal(state[k], stored[k]) for k in block if k in stored)
    api = surgery.apply(gpt2(), spec_for(name), ids())
    assert all(isinstance(loaded.get_submodule(n), LAYER[name]) for n in NAMES)
    assert all(torch.equal(state[k], v) for k, v in api.state_dict().items())
    x = ids(seed=8)
    assert torch.equal(logits(loaded, x), logits(api, x))
    assert not torch.equal(logits(loaded, x), logits(model, x))
