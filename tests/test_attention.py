"""nn.MultiheadAttention's projections as targets: the exact split equivalent
(``SplitMultiheadAttention``), the Transformer layers that run with it, and the
pipeline (plan, apply, calibration, budget, refit, export, save and load) on models
built like torchvision's ViT and on ``nn.TransformerEncoder``."""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import tnsurgery
from tnsurgery import surgery
from tnsurgery.errors import MatchError
from tnsurgery.layers.attention import SplitMultiheadAttention
from tnsurgery.layers.lowrank import LowRankLinear
from tnsurgery.layers.qat import QATLayer, QuantizedLayer
from tnsurgery.layers.tt import TTLinear
from tnsurgery.plugins import get_registry, qualified_name
from tnsurgery.transforms.attention import split_attention

PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _close(a: torch.Tensor | None, b: torch.Tensor | None, tol: float = 1e-6) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ exactness


CONFIGS = {
    "plain": {},
    "no_bias": {"bias": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 10, "vdim": 12},
    "kdim_vdim_bias_kv_no_bias": {"kdim": 10, "vdim": 12, "add_bias_kv": True, "bias": False},
}


def _masks(n: int, tgt: int, src: int, heads: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(3)
    pad = torch.rand(n, src, generator=gen) > 0.6
    pad[:, 0] = False  # (a row that masks every key gives NaNs, in both)
    blocked = torch.rand(tgt, src, generator=gen) > 0.7
    blocked[:, 0] = False
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "padding_bool": {"key_padding_mask": pad},
        "padding_float": {"key_padding_mask": torch.randn(n, src, generator=gen)},
        "attn_bool_2d": {"attn_mask": blocked},
        "attn_float_3d": {"attn_mask": torch.randn(n * heads, tgt, src, generator=gen)},
        "both": {"attn_mask": blocked, "key_padding_mask": pad},
        "causal": {"attn_mask": causal, "is_causal": True},
    }


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_split_computes_what_multihead_attention_computes(config, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.25, batch_first=batch_first, **CONFIGS[config])
    if mha.bias_k is not None:
        nn.init.normal_(mha.bias_k), nn.init.normal_(mha.bias_v)
    split = split_attention(mha)
    assert isinstance(split, SplitMultiheadAttention)
    assert [n for n, _ in split.named_children()] == list(PARTS)
    n, tgt, src = 3, 5, 6
    gen = torch.Generator().manual_seed(2)

    def seq(length: int, dim: int) -> torch.Tensor:
        shape = (n, length, dim) if batch_first else (length, n, dim)
        return torch.randn(shape, generator=gen)

    q, k, v = seq(tgt, 16), seq(src, mha.kdim), seq(src, mha.vdim)
    cases = _masks(n, tgt, src, 4)
    checked = 0
    for (_, kw), training, need, average in itertools.product(
        cases.items(), (False, True), (True, False), (True, False)
    ):
        mha.train(training), split.train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch's deprecation of mixed mask types)
            torch.manual_seed(7)  # dropout draws the same numbers
            want = mha(q, k, v, need_weights=need, average_attn_weights=average, **kw)
            torch.manual_seed(7)
            got = split(q, k, v, need_weights=need, average_attn_weights=average, **kw)
        _close(got[0], want[0])
        _close(got[1], want[1])
        checked += 1
    assert checked == len(cases) * 8
    # unbatched inputs (batch_first is then ignored, as by nn.MultiheadAttention)
    one = (q[0], k[0], v[0]) if batch_first else (q[:, 0], k[:, 0], v[:, 0])
    mha.eval(), split.eval()
    for need in (True, False):
        want = mha(
            *one, need_weights=need, key_padding_mask=cases["padding_bool"]["key_padding_mask"][0]
        )
        got = split(
            *one, need_weights=need, key_padding_mask=cases["padding_bool"]["key_padding_mask"][0]
        )
        _close(got[0], want[0])
        _close(got[1], want[1])
    # self-attention in eval without gradients: nn.MultiheadAttention's fused fast path
    x = seq(tgt, 16)
    if mha._qkv_same_embed_dim:
        with torch.no_grad():
            _close(split(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], 1e-5)


def test_split_is_a_copy_with_the_same_settings():
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).double().train(False)
    mha.in_proj_weight.requires_grad_(False)
    split = split_attention(mha)
    assert split.in_proj_weight.dtype == torch.float64 and not split.training
    assert not split.q_proj.weight.requires_grad and split.out_proj.weight.requires_grad
    for part in PARTS:  # its own tensors: the MHA is left as it is
        p = getattr(split, part).weight
        assert p.data_ptr() not in {t.data_ptr() for t in mha.parameters()}

    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)[0] * 2, None

    assert split_attention(Custom(16, 4)) is None  # another forward: never split
    assert split_attention(nn.Linear(3, 3)) is None


def test_split_answers_what_code_reads_on_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    split = split_attention(mha)
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first"):
        assert getattr(split, attr) == getattr(mha, attr), attr
    assert split._qkv_same_embed_dim and split.bias_k is None and not split.add_zero_attn
    # the stacked projections read like nn.MultiheadAttention's parameters, never written
    assert torch.equal(split.in_proj_weight + 0, mha.in_proj_weight)
    assert torch.equal(split.in_proj_bias * 1, mha.in_proj_bias)
    assert split.in_proj_weight.shape == (48, 16) and split.in_proj_weight.requires_grad
    assert split.q_proj_weight is None
    with pytest.raises(RuntimeError, match="writing to it"):
        nn.init.zeros_(split.in_proj_weight)
    assert [n for n, _ in split.named_parameters()] == [
        f"{p}.{t}" for p in PARTS for t in ("weight", "bias")
    ]  # (the stacked views are no parameters: in no state dict)
    other = split_attention(nn.MultiheadAttention(16, 4, kdim=6, vdim=5, bias=False))
    assert other.in_proj_weight is None and other.in_proj_bias is None
    assert other.k_proj_weight.shape == (16, 6) and other.v_proj_weight.shape == (16, 5)
    mask = torch.ones(3, 3, dtype=torch.bool).triu(1)
    query = torch.randn(2, 3, 16)
    merged, kind = split.merge_masks(mask, None, query)
    want, want_kind = mha.merge_masks(mask, None, query)
    assert kind == want_kind and torch.equal(merged, want)


def test_transformer_layers_run_with_the_split_and_stay_off_their_fused_paths():
    """nn.TransformerEncoder/EncoderLayer read ``self_attn.in_proj_weight`` in their
    fast-path checks (the encoder turns padded batches into nested tensors in eval
    without gradients): the split sends them down their ordinary path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor  # the fused path is on for the original
    split = nn.TransformerEncoder(layer, 2).eval()
    split.load_state_dict(encoder.state_dict())
    for lay in split.layers:
        lay.self_attn = split_attention(lay.self_attn)
    x = torch.randn(3, 5, 32)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    _close(split(x, src_key_padding_mask=pad), encoder(x, src_key_padding_mask=pad), 1e-5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got = encoder(x, src_key_padding_mask=pad), split(x, src_key_padding_mask=pad)
        # (the nested path leaves padded positions zero: only the others compare)
        _close(got[~pad], want[~pad], 1e-5)
        _close(split.layers[0](x), encoder.layers[0](x), 1e-5)
        mask = nn.Transformer.generate_square_subsequent_mask(5)
        _close(split(x, mask=mask, is_causal=True), encoder(x, mask=mask, is_causal=True), 1e-5)
    decoder = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0).eval()
    split_decoder = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0).eval()
    split_decoder.load_state_dict(decoder.state_dict())
    split_decoder.self_attn = split_attention(split_decoder.self_attn)
    split_decoder.multihead_attn = split_attention(split_decoder.multihead_attn)
    tgt, memory = torch.randn(5, 3, 32), torch.randn(7, 3, 32)
    with torch.no_grad():
        _close(split_decoder(tgt, memory), decoder(tgt, memory), 1e-5)


# ------------------------------------------------------------------ models


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, nn.MultiheadAttention, LayerNorm, MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """A small ViT shaped like torchvision's: patch conv, class token, encoder, head."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        blocks = OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, hidden)) for i in range(depth)
        )
        self.layers = nn.Sequential(blocks)
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, 10)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.heads(x[:, 0])


def _project(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@torch.no_grad()
def _low_rank_(model: nn.Module, rank: int) -> nn.Module:
    """Every projection of every attention and every Linear of rank ``rank`` at most:
    factorize at that rank is then exact."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_weight.copy_(
                torch.cat([_project(w, rank) for w in m.in_proj_weight.chunk(3)])
            )
        if isinstance(m, nn.Linear):
            m.weight.copy_(_project(m.weight, rank))
    return model


def vit(rank: int | None = None, **kw) -> ViT:
    torch.manual_seed(0)
    model = ViT(**kw).eval()
    return _low_rank_(model, rank) if rank else model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _attention_names(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in PARTS]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


FACTORIZE = {
    "rules": [{"match": "**", "types": ["Linear"], "transform": "factorize", "params": {"rank": 8}}]
}


# ------------------------------------------------------------------ pipeline


def test_vit_factorize_plans_applies_saves_and_loads_the_projections(tmp_path):
    model, x = vit(rank=8), images()
    with torch.no_grad():
        want = model(x)
    plan = surgery.plan(model, FACTORIZE, x)
    assert all(type(b.self_attention) is nn.MultiheadAttention for b in model.layers)
    assert plan.passes[0].trace == "torch.fx symbolic trace"
    rows = {t.name: t for t in plan.targets}
    for i in range(2):
        block = f"layers.encoder_layer_{i}"
        for name in _attention_names(f"{block}.self_attention"):
            assert rows[name].status == "replace", (name, rows[name].reason)
            assert rows[name].module_type == "Linear" and rows[name].calls == 1
            assert rows[name].input_shape == (2, 17, 32)
    listed = [t["name"] for t in plan.to_dict()["targets"]]
    assert "layers.encoder_layer_0.self_attention.out_proj" in listed
    assert "layers.encoder_layer_0.self_attention" not in listed

    small = surgery.apply(model, FACTORIZE, x)
    assert all(type(b.self_attention) is nn.MultiheadAttention for b in model.layers)
    attn = small.layers.encoder_layer_1.self_attention
    assert isinstance(attn, SplitMultiheadAttention)
    assert all(isinstance(getattr(attn, p), LowRankLinear) for p in PARTS)
    with torch.no_grad():
        got = small(x)
    assert _error(got, want) < 1e-4  # the weights have rank 8: exact up to rounding
    manifest = surgery.get_manifest(small)
    assert manifest["output_error"] < 1e-4
    reps = manifest["replacements"]
    splits = [r for r in reps if r.get("operation") == "split"]
    assert [r["name"] for r in splits] == [
        f"layers.encoder_layer_{i}.self_attention" for i in range(2)
    ]
    assert splits[0]["layer"] == qualified_name(SplitMultiheadAttention)
    assert splits[0]["split"] == "multihead_attention"
    first = {r["name"]: i for i, r in enumerate(reps)}
    assert (
        first["layers.encoder_layer_0.self_attention"]
        < first["layers.encoder_layer_0.self_attention.q_proj"]
    )
    # the stacked in-projection model code reads follows the compressed projections
    dense = torch.cat([getattr(attn, p).to_dense() for p in PARTS[:3]])
    assert torch.allclose(attn.in_proj_weight * 1, dense)

    # gradients reach the factors of every projection
    small.train()
    small(x).square().sum().backward()
    for p in PARTS:
        for name, param in getattr(attn, p).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (p, name)

    small.eval()
    path = tnsurgery.save(small, tmp_path / "vit")
    loaded = tnsurgery.load(path, vit())
    assert isinstance(loaded.layers.encoder_layer_0.self_attention, SplitMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_vit_tt_on_attention_projections():
    """Weights that are sums of two Kronecker products have TT rank 2 on (8, 8) modes:
    TT at rank 2 rebuilds them, through the split projections."""
    model, x = vit(dim=64, heads=4, hidden=128), images()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.layers:
            mha = block.self_attention

            def kron2() -> torch.Tensor:
                a, b, c, d = (torch.randn(8, 8, generator=gen) * 0.3 for _ in range(4))
                return torch.kron(a, b) + torch.kron(c, d)

            mha.in_proj_weight.copy_(torch.cat([kron2() for _ in range(3)]))
            mha.out_proj.weight.copy_(kron2())
        want = model(x)
    spec = {
        "rules": [
            {
                "match": "**.self_attention.*",
                "transform": "tt",
                "params": {"ranks": 2, "in_factors": [8, 8], "out_factors": [8, 8]},
            }
        ]
    }
    plan = surgery.plan(model, spec, x)
    assert [t.name for t in plan.targets] == [
        n for i in range(2) for n in _attention_names(f"layers.encoder_layer_{i}.self_attention")
    ]
    assert all(t.status == "replace" and t.predicted_error < 1e-5 for t in plan.targets)
    small = surgery.apply(model, spec, x)
    attn = small.layers.encoder_layer_0.self_attention
    assert all(isinstance(getattr(attn, p), TTLinear) for p in PARTS)
    assert all(isinstance(b.mlp[0], nn.Linear) for b in small.layers)  # not matched
    with torch.no_grad():
        assert _error(small(x), want) < 1e-4


def test_vit_qat_then_export_and_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model, x = vit(), images()
    spec = {
        "rules": [
            {"match": "layers.**", "transform": "factorize", "params": {"rank": 12}},
            {"match": "layers.**", "transform": "qat", "params": {"bits": 8}},
        ]
    }
    small = surgery.apply(model, spec, x)
    attn = small.layers.encoder_layer_0.self_attention
    assert all(isinstance(getattr(attn, p), QATLayer) for p in PARTS)
    assert isinstance(attn.q_proj.inner, LowRankLinear)
    reps = surgery.get_manifest(small)["replacements"]
    assert sum(r.get("operation") == "split" for r in reps) == 2  # split once, for both rules
    exported = tnsurgery.convert(small, x)
    assert all(
        isinstance(getattr(exported.layers.encoder_layer_1.self_attention, p), QuantizedLayer)
        for p in PARTS
    )
    assert surgery.get_manifest(exported)["output_error"] < 1e-5
    path = tnsurgery.save(exported, tmp_path / "exported")
    with torch.no_grad():
        y = exported(x)
        assert torch.equal(tnsurgery.load(path, vit())(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(exported, (x,), str(tmp_path / "vit.onnx"), dynamo=False)
    graph = onnx.load(str(tmp_path / "vit.onnx"))
    (got,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), y, rtol=1e-4, atol=1e-4)


def test_transformer_encoder_projections_through_factorize(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = _low_rank_(nn.TransformerEncoder(layer, 2).eval(), 8)
    x = torch.randn(3, 5, 32)
    plan = surgery.plan(encoder, FACTORIZE, x)
    names = {t.name: t.status for t in plan.targets}
    for i in range(2):
        for n in _attention_names(f"layers.{i}.self_attn"):
            assert names[n] == "replace", n
    small = surgery.apply(encoder, FACTORIZE, x)
    assert isinstance(small.layers[1].self_attn.k_proj, LowRankLinear)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():  # the nested fast path of the encoder is left, not crashed into
        got, want = small(x, src_key_padding_mask=pad), encoder(x, src_key_padding_mask=pad)
    _close(got[~pad], want[~pad], 1e-4)
    loaded = tnsurgery.load(
        tnsurgery.save(small, tmp_path / "enc"), nn.TransformerEncoder(layer, 2).eval()
    )
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_only_attentions_with_a_replaced_part_are_split():
    model, x = vit(), images()
    # a pattern that names no block's attention: nothing is split
    spec = {
        "rules": [
            {
                "match": "layers.encoder_layer_1.mlp.*",
                "transform": "factorize",
                "params": {"rank": 8},
            }
        ]
    }
    small = surgery.apply(model, spec, x)
    assert all(type(b.self_attention) is nn.MultiheadAttention for b in small.layers)
    assert not any(r.get("operation") for r in surgery.get_manifest(small)["replacements"])
    # excluded, or every part skipped (rank 20 would not shrink a 32x32 projection but
    # does shrink the 32x64 MLP Linears): put back as it was
    spec = {
        "rules": [
            {
                "match": "layers.encoder_layer_0.**",
                "transform": "factorize",
                "params": {"rank": 20},
            },
            {"match": "**.out_proj", "exclude": ["layers.encoder_layer_0.**"], "transform": "qat"},
        ]
    }
    small = surgery.apply(model, spec, x)
    first, second = (b.self_attention for b in small.layers)
    assert type(first) is nn.MultiheadAttention and isinstance(
        small.layers[0].mlp[0], LowRankLinear
    )
    assert isinstance(second, SplitMultiheadAttention) and isinstance(second.out_proj, QATLayer)
    assert type(second.q_proj) is nn.Linear
    splits = [r["name"] for r in surgery.get_manifest(small)["replacements"] if r.get("operation")]
    assert splits == ["layers.encoder_layer_1.self_attention"]


def test_inplace_splits_the_model_itself_and_restores_it_on_failure():
    model, x = vit(), images()
    before = [b.self_attention for b in model.layers]
    small = surgery.apply(model, FACTORIZE, x, inplace=True)
    assert small is model and isinstance(model.layers[0].self_attention, SplitMultiheadAttention)
    model = vit()
    before = [b.self_attention for b in model.layers]
    too_big = {
        "rules": [
            {"match": "**.self_attention.*", "transform": "factorize", "params": {"rank": 30}}
        ]
    }
    with pytest.raises(MatchError, match="nothing was replaced"):
        surgery.apply(model, too_big, x, inplace=True)
    assert [b.self_attention for b in model.layers] == before  # the same objects


def test_a_rule_on_the_attention_itself_names_its_parts():
    spec = {
        "rules": [
            {
                "match": "**",
                "types": ["MultiheadAttention"],
                "transform": "factorize",
                "params": {"rank": 4},
            }
        ]
    }
    with pytest.raises(MatchError) as info:
        surgery.plan(vit(), spec, images())
    message = str(info.value)
    assert (
        "rule 0 (match '**'): its transform 'factorize' does not take MultiheadAttention "
        "modules" in message
    )
    parts = (
        "its parts q_proj, k_proj, v_proj, out_proj are targets (split by "
        "'multihead_attention'): match them, e.g. 'layers.encoder_layer_0.self_attention.*'"
    )
    assert f"MultiheadAttention: {parts}" in message
    hint = f"MultiheadAttention (2): no installed transform takes it; {parts}"
    model = vit()
    with pytest.raises(MatchError) as info:  # the module itself, with a transform of Linears
        surgery.apply(model, {"rules": [{"match": "**.self_attention", "transform": "qat"}]})
    assert hint in str(info.value) and "matches no Linear or Conv2d" in str(info.value)
    assert all(type(b.self_attention) is nn.MultiheadAttention for b in model.layers)


def test_shared_attention_is_not_split():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.MultiheadAttention(16, 4)
            self.b = self.a  # one module under two names

        def forward(self, x):
            return self.b(self.a(x, x, x)[0], x, x)[0]

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(5, 2, 16)
    plan = surgery.plan(
        model,
        {
            "rules": [
                {
                    "match": "a.*",
                    "transform": "factorize",
                    "params": {"rank": 4},
                    "allow_empty": True,
                }
            ]
        },
        x,
    )
    assert type(model.a) is nn.MultiheadAttention
    assert [t.name for t in plan.targets] == ["a.out_proj"] and plan.targets[0].status == "refuse"


def test_calibration_budget_and_sequential_refit_reach_the_projections(tmp_path):
    model = vit()
    data = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.save(data, tmp_path / "calib.pt")
    spec = {
        "rules": [{"match": "layers.**", "transform": "factorize"}],
        "calibration": {
            "data": {"source": "tensors", "path": str(tmp_path / "calib.pt")},
            "sequential": True,
        },
        "budget": {"params": 0.7},
    }
    small = surgery.apply(model, spec)
    manifest = surgery.get_manifest(small)
    budgeted = {layer["name"] for layer in manifest["budget"]["layers"]}
    assert set(_attention_names("layers.encoder_layer_0.self_attention")) <= budgeted
    targets = {t["name"]: t for t in manifest["plan"]["targets"]}
    q = targets["layers.encoder_layer_0.self_attention.q_proj"]
    assert q["predicted_output_error"] is not None
    assert manifest["plan"]["calibration"]["sequential"]["groups"] > 0
    replaced = [
        t for n, t in targets.items() if ".self_attention." in n and t["status"] == "replace"
    ]
    assert replaced  # refitted in call order on the inputs the surgered model gives them
    assert all(t["resolved"]["sequential"] in ("refitted", "kept") for t in replaced)
    refitted = [t for t in targets.values() if t["resolved"].get("sequential") == "refitted"]
    assert any(".self_attention." in t["name"] for t in refitted)
    with torch.no_grad():
        assert _error(small(data), model(data)) < 1


def test_split_is_declared_for_load():
    registry = get_registry()
    assert registry.splits["multihead_attention"].parts == PARTS
    assert (
        registry.layer_classes()[qualified_name(SplitMultiheadAttention)] is SplitMultiheadAttention
    )
    assert registry.split_origins["multihead_attention"] == "builtin"


def test_training_changes_only_the_replaced_projections():
    model, x = vit(), images()
    spec = {
        "rules": [{"match": "**.q_proj", "transform": "factorize", "params": {"rank": 8}}],
        "training": {
            "data": {"source": "random", "shape": [3, 16, 16]},
            "steps": 2,
            "trainable": "surgered",  # (the default, "all", trains the model)
        },
    }
    small = surgery.apply(model, spec, x)
    attn, mha = (
        small.layers.encoder_layer_0.self_attention,
        model.layers.encoder_layer_0.self_attention,
    )
    assert isinstance(attn.q_proj, LowRankLinear)
    assert torch.equal(attn.k_proj.weight, mha.in_proj_weight[32:64])
    assert torch.equal(attn.out_proj.weight, mha.out_proj.weight)
