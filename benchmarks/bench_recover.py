"""Recovering all-MiniLM-L6-v2 at half its encoder Linear parameters (issue 6).

The real all-MiniLM-L6-v2, its 36 encoder Linear layers factorized to 50 % of
their parameters. Figure of merit: the mean cosine similarity of mean-pooled
sentence embeddings to the original model's, on held-out general-domain
sentences written for this benchmark (``sentences.EVAL``). Rows:

- plain SVD, ``param_ratio`` 0.5 for every layer (no data);
- calibrated: whitened factorization from N sentences of unlabeled text from
  another source, ``param_ratio`` 0.5 for every layer, no training;
- calibrated + budget: the same 50 % of the 36 layers' parameters in total,
  split between layers by the budget (each layer's calibrated output error
  curve times its measured sensitivity), no training; goal >= 0.80;
- calibrated + budget + sequential: the factorized layers then re-solved in
  call order for the inputs the surgered layers before them give them;
- tt and tucker on the 12 FFN Linears only (``param_ratio`` 0.5 each), plain
  and calibrated (whitened over a Kronecker-factored input moment);
- distilled: label-free distillation of the last factorize start (by default the last
  hidden state matched by normalized MSE, every parameter training) on other
  sentences of the same unlabeled corpus; goal >= 0.98 within 10 minutes of
  training.

The unlabeled corpus (``--corpus auto``): WordNet's usage examples (Debian's
``wordnet-base``: everyday English sentences), else Debian's ``fortunes``
(quotes and jokes), else docstrings of Python's standard library.

    python benchmarks/bench_recover.py [--samples 512 2048] [--steps 1800] [--lr 3e-4]
        [--corpus auto|wordnet|fortunes|docstrings] [--trainable all|surgered]
        [--features none|surgered] [--no-sequential] [--no-tensor]    # about 15 minutes
    python benchmarks/bench_recover.py --quick    # smoke check: 64 sentences, 20 steps
"""

from __future__ import annotations

import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sentences
from common import MINILM_ENCODER, cosines, embed, minilm, parser, start, tokens

from tnsurgery import bench, surgery
from tnsurgery.builtins.docstrings import docstring_sentences

EVAL = sentences.EVAL  # held out: never seen by calibration (or training)

FORTUNES = Path("/usr/share/games/fortunes")  # Debian's `fortunes` package
FORTUNE_FILES = (
    "fortunes literature people science wisdom work food education humorists politics pets "
    "love miscellaneous platitudes songs-poems sports art medicine news law kids riddles "
    "magic goedel linux computers"
).split()
WORDNET = Path("/usr/share/wordnet")  # Debian's `wordnet-base` package


def shuffled_unique(sents: list[str], seed: int) -> list[str]:
    """Each sentence once, in an order fixed by ``seed``."""
    out = sorted(set(sents))
    random.Random(seed).shuffle(out)
    return out


def fortune_corpus(seed: int = 0) -> list[str]:
    """General-domain English sentences from Debian's fortune files (quotes, jokes,
    aphorisms; `apt-get install fortunes`), attributions removed; empty if absent."""
    sents: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNES / name
        if not path.exists():
            continue
        for entry in path.read_text(errors="ignore").split("\n%\n"):
            text = re.sub(r"\s*--\s.*$", "", re.sub(r"\s+", " ", entry).strip())
            for s in re.split(r"(?<=[.!?])\s+", text):
                if (
                    30 <= len(s) <= 200
                    and re.match(r"^[A-Z]", s)
                    and not re.search(r"[<>{}\[\]|\\_=@#~^]", s)
                ):
                    sents.append(s)
    return shuffled_unique(sents, seed)


def wordnet_corpus(seed: int = 0) -> list[str]:
    """The usage examples of WordNet 3.0's synsets (`apt-get install wordnet-base`):
    about 30 000 short everyday English sentences and phrases ("her face went red
    with anger"), written by lexicographers; empty if absent."""
    out: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        path = WORDNET / f"data.{part}"
        if not path.exists():
            continue
        for line in path.read_text(errors="ignore").splitlines():
            if line.startswith("  ") or "| " not in line:  # the licence header
                continue
            for piece in line.split("| ", 1)[1].split("; "):
                m = re.fullmatch(r'"(.*)"', piece.strip())
                if m and len(m.group(1)) >= 25:
                    out.append(m.group(1))
    return shuffled_unique(out, seed)


def docstring_corpus(seed: int = 0) -> list[str]:
    """English sentences from the docstrings of standard-library modules: unlabeled
    text from another domain than the evaluation sentences (the ``docstrings`` corpus of
    tnsurgery's ``sentences`` data source)."""
    return docstring_sentences(seed)


CORPORA = {
    "wordnet": (wordnet_corpus, "WordNet 3.0 usage examples (Debian wordnet-base)"),
    "fortunes": (fortune_corpus, "Debian fortunes (general-domain quotes)"),
    "docstrings": (docstring_corpus, "standard-library docstrings"),
}


def pick_corpus(choice: str) -> tuple[list[str], str]:
    """The unlabeled sentences and their description (auto: the first installed)."""
    for name in CORPORA if choice == "auto" else (choice,):
        make, source = CORPORA[name]
        sents = make()
        if sents:
            return sents, source
        if choice != "auto":
            raise SystemExit(f"corpus {name!r} is not installed here (see the docstring)")
    raise SystemExit("no corpus")


def detail(small) -> str:
    """The calibration's own figures, for the line under a calibrated row."""
    plan = surgery.get_manifest(small)["plan"]
    done = [t for t in plan["targets"] if t["status"] == "replace"]
    errs = [t["predicted_output_error"] for t in done]
    seq = [
        t["resolved"]["sequential_output_error"]
        for t in done
        if t["resolved"].get("sequential_output_error") is not None
    ]
    cal = plan["calibration"]
    text = (
        f"  calibration {cal['seconds']:.1f} s; predicted layer output error median "
        f"{statistics.median(errs):.3f}"
    )
    if seq:
        text += (
            f"; sequential pass {cal['sequential']['seconds']:.1f} s over "
            f"{cal['sequential']['groups']} groups, layer output error median "
            f"{statistics.median(seq):.3f}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "smoke check: 64 calibration sentences, 20 distillation steps")
    ap.add_argument("--samples", type=int, nargs="+", help="calibration sizes (512 2048)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, help="distillation steps (1800; 0: none)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--trainable", default="all", choices=("all", "surgered"))
    ap.add_argument(
        "--features", default="none", choices=("none", "surgered"), help="distill.features"
    )
    ap.add_argument("--no-sequential", action="store_true", help="skip the sequential rows")
    ap.add_argument("--no-tensor", action="store_true", help="skip the tt / tucker rows")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--corpus", choices=("auto", *CORPORA), default="auto")
    ap.add_argument("--train-max-length", type=int, default=64)
    ap.add_argument(
        "--output-loss", default="mse", choices=("mse", "cosine"), help="distill.output"
    )
    args = ap.parse_args(argv)
    args.samples = args.samples or ([64] if args.quick else [512, 2048])
    if args.steps is None:
        args.steps = 20 if args.quick else 1800
    rec = start("bench_recover", args, libraries=("transformers",))
    tok, model = minilm()
    corpus, source = pick_corpus(args.corpus)
    held = tokens(tok, EVAL, 64)
    reference = embed(model, held)
    t = rec.table(
        "recover",
        f"all-MiniLM-L6-v2, 36 encoder Linears at 50 % of their parameters; {len(EVAL)} "
        f"held-out sentences; unlabeled corpus: {len(corpus)} sentences of {source}",
        ["start", "calibration sentences", "training steps", "seconds", "cosine mean", "min"],
        formats={"cosine mean": ".4f", "min": ".4f"},
    )

    def row(name, spec, samples, calibrated=False):
        secs, small = bench.time_once(lambda: surgery.apply(model, spec), f"surgery: {name}")
        cos = cosines(small, held, reference)
        t.add(name, samples, 0, f"{secs:.1f} (surgery)", float(cos.mean()), float(cos.min()))
        if calibrated:
            t.add(detail(small), "", "", "", "", "")
            starts.append((name, samples, float(cos.mean())))
        print(f"  {name}, {samples}: {float(cos.mean()):.4f} ({secs:.1f} s)", flush=True)
        return small

    starts: list[tuple[str, int, float]] = []  # calibrated factorize: name, samples, cosine
    uniform = {**MINILM_ENCODER, "params": {"param_ratio": 0.5}}
    row("plain SVD", {"rules": [uniform]}, 0)
    small = None
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "calib.txt"

        def calibration(n: int, **extra) -> dict:
            text.write_text("\n".join(corpus[:n]) + "\n", encoding="utf-8")
            data = {"source": "text", "path": str(text), "max_length": args.max_length}
            return {"data": data, "samples": n, **extra}

        for n in args.samples:
            row("calibrated", {"rules": [uniform], "calibration": calibration(n)}, n, True)
            budget = {"rules": [MINILM_ENCODER], "budget": {"params": 0.5}}
            spec = {**budget, "calibration": calibration(n)}
            small = row("calibrated + budget", spec, n, True)
            if not args.no_sequential:
                spec = {**budget, "calibration": calibration(n, sequential=True)}
                small = row("calibrated + budget + sequential", spec, n, True)
        if not args.no_tensor:  # data-aware tt / tucker (Kronecker-factored whitening)
            n = max(args.samples)
            ffn = {
                **MINILM_ENCODER,
                "match": r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense",
            }
            for transform in ("tt", "tucker"):
                rule = {**ffn, "transform": transform, "params": {"param_ratio": 0.5}}
                row(f"{transform}, FFN Linears only: plain", {"rules": [rule]}, 0)
                spec = {"rules": [rule], "calibration": calibration(n)}
                row(f"{transform}, FFN Linears only: calibrated", spec, n)
        if args.steps:
            n = max(args.samples)
            train_text = Path(tmp) / "train.txt"
            train_text.write_text("\n".join(corpus[n:]) + "\n", encoding="utf-8")
            curve = distill(t, model, small, train_text, args, held, reference, n)
            within = [c for c in curve if c[1] <= 600] or curve[:1]
            step, secs, cos = max(within, key=lambda c: c[2])
            t.goal(
                "cosine >= 0.98 after distillation within 10 minutes of training",
                cos >= 0.98,
                f"{cos:.4f} after {step} steps ({secs:.0f} s of training); at the end "
                f"{curve[-1][2]:.4f} after {curve[-1][0]} steps ({curve[-1][1]:.0f} s)",
            )
    if starts:
        best = max(starts, key=lambda s: s[2])
        same = max((s for s in starts if s[0] == "calibrated"), key=lambda s: s[2])
        t.goal(
            "cosine >= 0.80 calibrated, without training",
            best[2] >= 0.8,
            f"best {best[2]:.4f} ({best[0]}, {best[1]} sentences); the same ratio for every "
            f"layer: {same[2]:.4f} ({same[1]} sentences)",
        )
    rec.finish(args.out)
    return 0


def distill(t: bench.Table, model, small, train_text, args, held, reference, samples) -> list:
    """Label-free distillation of the last start; cosine on the held-out set every
    100 steps (10 in a quick run; reported only, never used to choose a state, and
    not counted in the training time)."""
    training = {
        "data": {"source": "text", "path": str(train_text), "max_length": args.train_max_length},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": max(1, args.steps // 20),
        "keep_best": False,
        "trainable": args.trainable,
        "distill": {"output": args.output_loss, "features": args.features},
    }
    every = 10 if args.quick else 100
    clock = {"train": 0.0, "since": time.perf_counter()}

    def progress(step, total, metrics):
        if step % every == 0 or step == total:
            clock["train"] += time.perf_counter() - clock["since"]
            cos = cosines(small, held, reference)
            t.add(
                "  distilled",
                samples,
                step,
                f"{clock['train']:.0f} (training)",
                float(cos.mean()),
                float(cos.min()),
            )
            print(f"  distilled {step}: {float(cos.mean()):.4f}", flush=True)
            curve.append((step, clock["train"], float(cos.mean())))
            clock["since"] = time.perf_counter()

    curve: list[tuple[int, float, float]] = []  # (step, training seconds, cosine)
    with bench.watch("distillation"):
        surgery.train(small, training, model, progress=progress)
    return curve


if __name__ == "__main__":
    sys.exit(main())
