"""Which defaults of the ``training`` section recover best in a short run (issue 13).

The minimal training section, ``{"mode": "distill", "data": ..., "steps": N}``,
must give the best short-run recovery we know. This script runs that section with
each candidate set of defaults (the options a user does not write) on:

- the digits MLP (64-512-512-10, trained here on scikit-learn's digits), its middle
  Linear cut to rank 4, then its two big Linears as TT (ranks 14, d=3); label-free
  distillation on the training images; figure: test accuracy;
- all-MiniLM-L6-v2 with every encoder Linear at half its parameters (calibrated on
  512 of the built-in ``sentences``, no budget), then label-free distillation on the
  other built-in sentences (batch 32, 64 tokens); figure: mean cosine of the held-out
  sentence embeddings (``sentences.EVAL``) to the original's.

The candidates are :data:`CANDIDATES`, each a dict of training options (the rest
left to the spec's defaults); the last row sets nothing: the defaults as they are.

    python benchmarks/bench_defaults.py [--steps 300] [--minilm-steps 300]   # about 20 min
    python benchmarks/bench_defaults.py --quick                            # digits only, 40 steps
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import sentences
import torch
from bench_digits_tt import train_dense
from common import MINILM_ENCODER, accuracy, cosines, digits, embed, minilm, parser, start, tokens

from tnsurgery import surgery

# The candidates: the options each sets; everything else is the spec's default.
CANDIDATES = {
    "A: surgered layers, feature loss, lr 1e-4 (0.x defaults)": {
        "trainable": "surgered",
        "lr": 1e-4,
        "warmup_steps": 0,
        "distill": {"features": "surgered"},
    },
    "B: every parameter, feature loss, lr 1e-4": {
        "trainable": "all",
        "lr": 1e-4,
        "warmup_steps": 0,
        "distill": {"features": "surgered"},
    },
    "C: every parameter, outputs only, lr 3e-4, 10 % warmup": {
        "trainable": "all",
        "lr": 3e-4,
        "warmup": 0.1,
        "distill": {"features": "none"},
    },
    "D: every parameter, feature loss, lr 3e-4, 10 % warmup": {
        "trainable": "all",
        "lr": 3e-4,
        "warmup": 0.1,
        "distill": {"features": "surgered"},
    },
    "E: surgered layers, feature loss, lr 3e-4, 10 % warmup": {
        "trainable": "surgered",
        "lr": 3e-4,
        "warmup": 0.1,
        "distill": {"features": "surgered"},
    },
    "the defaults (nothing set)": {},
}


def section(options: dict, data: dict, steps: int, **extra) -> dict:
    """The training section of one run: the minimal one plus the candidate's options."""
    opts = dict(options)
    warmup = opts.pop("warmup", None)
    if warmup is not None:
        opts["warmup_steps"] = max(1, round(warmup * steps))
    return {"mode": "distill", "data": data, "steps": steps, **extra, **opts}


def run_digits(rec, steps: int, quick: bool) -> None:
    xtr, xte, ytr, yte = digits(0)
    model = train_dense(xtr, ytr, 5 if quick else 30)
    dense = 100 * accuracy(model, xte, yte)
    cases = {
        "middle Linear at rank 4": [
            {"match": "2", "transform": "factorize", "params": {"rank": 4}}
        ],
        "both big Linears as TT (ranks 14, d=3)": [
            {"match": "[02]", "transform": "tt", "params": {"ranks": 14, "d": 3}}
        ],
    }
    t = rec.table(
        "defaults_digits",
        f"digits MLP 64-512-512-10 (dense test accuracy {dense:.2f} %); label-free "
        f"distillation, {steps} steps, the spec's default batch size",
        ["surgery", "training options", "test accuracy %", "seconds"],
        formats={"test accuracy %": ".2f", "seconds": ".1f"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(xtr, Path(tmp) / "unlabeled.pt")
        data = {"source": "tensors", "path": str(Path(tmp) / "unlabeled.pt")}
        for case, rules in cases.items():
            small = surgery.apply(model, {"rules": rules})
            t.add(case, "no training", 100 * accuracy(small, xte, yte), 0.0)
            for name, options in CANDIDATES.items():
                student = copy.deepcopy(small)
                torch.manual_seed(0)
                began = time.perf_counter()
                surgery.train(student, section(options, data, steps), model)
                secs = time.perf_counter() - began
                acc = 100 * accuracy(student, xte, yte)
                t.add(case, name, acc, secs)
                print(f"  digits, {case}, {name}: {acc:.2f} % ({secs:.1f} s)", flush=True)


def run_minilm(rec, steps: int, candidates: list[str], calibration: int) -> None:
    tok, model = minilm()
    held = tokens(tok, sentences.EVAL, 128)
    reference = embed(model, held)
    t = rec.table(
        "defaults_minilm",
        f"all-MiniLM-L6-v2, every encoder Linear at half its parameters, calibrated on "
        f"{calibration} built-in everyday sentences (the 'sentences' source); label-free "
        f"distillation, {steps} steps of 32 x 64 tokens on the other built-in sentences; "
        f"mean held-out cosine ({len(sentences.EVAL)} sentences)",
        ["training options", "cosine mean", "cosine min", "seconds"],
        formats={"cosine mean": ".4f", "cosine min": ".4f", "seconds": ".0f"},
    )
    spec = {
        "rules": [{**MINILM_ENCODER, "params": {"param_ratio": 0.5}}],
        "calibration": {
            "data": {"source": "sentences", "max_length": 128},
            "samples": calibration,
        },
    }
    small = surgery.apply(model, spec)
    cos = cosines(small, held, reference)
    t.add("no training", float(cos.mean()), float(cos.min()), 0)
    data = {"source": "sentences", "skip": calibration, "max_length": 64, "shuffle": True}
    for name in candidates:
        student = copy.deepcopy(small)
        torch.manual_seed(0)
        began = time.perf_counter()
        surgery.train(student, section(CANDIDATES[name], data, steps, batch_size=32), model)
        secs = time.perf_counter() - began
        cos = cosines(student, held, reference)
        t.add(name, float(cos.mean()), float(cos.min()), secs)
        print(f"  minilm, {name}: {float(cos.mean()):.4f} ({secs:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "digits only, 5 dense epochs, 40 steps")
    ap.add_argument("--steps", type=int, help="digits training steps (300; quick 40)")
    ap.add_argument("--minilm-steps", type=int, default=300, help="MiniLM steps (300)")
    ap.add_argument("--calibration", type=int, default=512, help="MiniLM calibration sentences")
    ap.add_argument(
        "--minilm-candidates",
        nargs="+",
        default=["A", "C", "D", "the"],
        help="which candidates run on MiniLM, by their first word (A C D the)",
    )
    ap.add_argument("--no-minilm", action="store_true", help="digits only")
    ap.add_argument("--no-digits", action="store_true", help="MiniLM only")
    args = ap.parse_args(argv)
    rec = start("bench_defaults", args)
    if not args.no_digits:
        run_digits(rec, args.steps or (40 if args.quick else 300), args.quick)
    if not (args.quick or args.no_minilm):
        chosen = [n for n in CANDIDATES if n.split(":")[0].split()[0] in args.minilm_candidates]
        run_minilm(rec, args.minilm_steps, chosen, args.calibration)
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
