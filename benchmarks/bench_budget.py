"""Global budget vs a uniform ratio, end to end on the real all-MiniLM-L6-v2.

Every encoder Linear (36) is factorized so that, in total, they keep half of
their parameters: once with a uniform ``param_ratio`` of 0.5, once with a
spec-level ``"budget": {"params": 0.5}`` whose per-layer ratios come from
each layer's measured effect on the output (sensitivity on a sample batch).
The figure of merit is the mean cosine similarity of mean-pooled sentence
embeddings to the original model's, on held-out sentences that were not
used to measure sensitivities. No training. Budgets on parameters and on
FLOPs. A second part times the allocation on a BERT-base-sized model (12
layers, hidden 768, built from its config: 72 encoder Linears, 85 M
parameters), which the issue asks to take seconds. The ``apply`` of every
spec is timed interleaved with the others', round by round.

    python benchmarks/bench_budget.py [--part minilm|bert|all]   # about 5 minutes
    python benchmarks/bench_budget.py --quick    # smoke check: 2 specs, a 2-layer BERT
"""

from __future__ import annotations

import sys

import sentences
import torch
from common import MINILM_ENCODER, cosines, embed, minilm, parser, start, tokens

from tnsurgery import bench, get_manifest, surgery

SAMPLE = [  # used by the budget to measure each layer's sensitivity
    "The cat sat on the mat by the window.",
    "Stock markets fell sharply on Monday after the report.",
    "How do I bake sourdough bread at home?",
    "The theory of relativity changed physics forever.",
    "Please send me the invoice by Friday afternoon.",
    "Rain is expected over the weekend in the north.",
    "She plays the violin in a string quartet.",
    "Neural networks can approximate many functions.",
    "The train to Paris leaves at seven.",
    "Our team won the match in extra time.",
    "This recipe needs two eggs and some flour.",
    "The new phone has a better camera.",
]
HELD_OUT = sentences.HELD_OUT  # never seen by the allocation


def specs(names: list[str]) -> dict[str, dict]:
    """The compared specs: ``"uniform R"`` or ``"params R"`` / ``"flops R"`` (a budget)."""
    out = {}
    for name in names:
        kind, ratio = name.split()
        if kind == "uniform":
            rule = {**MINILM_ENCODER, "params": {"param_ratio": float(ratio)}}
            out[f"uniform param_ratio {ratio}"] = {"rules": [rule]}
        else:
            rule = {**MINILM_ENCODER, "params": {}}
            out[f"budget {kind} {ratio}"] = {"rules": [rule], "budget": {kind: float(ratio)}}
    return out


def target_ratios(manifest: dict) -> tuple[float, float]:
    """Parameters and FLOPs of every target after / before (layers kept dense count as
    unchanged)."""
    targets = manifest["plan"]["targets"]

    def ratio(key: str) -> float:
        before = sum(t[f"{key}_before"] for t in targets)
        after = sum(
            t[f"{key}_after"] if t["status"] == "replace" else t[f"{key}_before"] for t in targets
        )
        return after / before

    return ratio("params"), ratio("flops")


def timed_applies(model, compared: dict[str, dict], sample, reps: int, label: str):
    """``surgery.apply`` of every spec, interleaved round by round."""
    fns = {
        name: (lambda spec=spec: surgery.apply(model, spec, sample))
        for name, spec in compared.items()
    }
    return bench.interleave(fns, reps, warmup=0, label=label)


def minilm_part(rec: bench.Record, quick: bool, reps: int) -> None:
    tok, model = minilm()
    sample, held = tokens(tok, SAMPLE, 48), tokens(tok, HELD_OUT, 48)
    reference = embed(model, held)
    names = ["uniform 0.5", "params 0.5"]
    if not quick:
        names += ["uniform 0.25", "params 0.25", "flops 0.5"]
    compared = specs(names)
    t = rec.table(
        "minilm",
        f"all-MiniLM-L6-v2, 36 encoder Linears, {len(HELD_OUT)} held-out sentences "
        f"(apply: {reps} interleaved round(s))",
        (
            "spec | target params after/before | target FLOPs after/before | apply s |"
            " held-out cosine (mean) | min"
        ),
        formats={
            "target params after/before": ".3f",
            "target FLOPs after/before": ".3f",
            "apply s": ".2f",
            "held-out cosine (mean)": ".4f",
            "min": ".4f",
        },
    )
    tm = timed_applies(model, compared, sample, reps, "minilm apply")
    for name in compared:
        small = tm.results[name]
        params, flops = target_ratios(get_manifest(small))
        cos = cosines(small, held, reference)
        t.add(name, params, flops, tm.s(name), float(cos.mean()), float(cos.min()))


def bert_part(rec: bench.Record, quick: bool, reps: int) -> None:
    """Time the budget allocation on a BERT-base-sized model (random weights: only the
    time is measured here, and the budget meeting its target)."""
    import transformers

    config = transformers.BertConfig()  # the bert-base-uncased sizes
    if quick:
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_params = sum(p.numel() for p in model.parameters())
    compared = specs(["uniform 0.5", "params 0.5", "flops 0.5"])
    t = rec.table(
        "bert",
        f"BERT-base sizes (BertConfig(), {config.num_hidden_layers} layers, "
        f"{n_params / 1e6:.1f} M params, random weights), {6 * config.num_hidden_layers} "
        f"encoder Linears, sample input 2x64 tokens (apply: {reps} interleaved round(s))",
        ["spec", "target params after/before", "target FLOPs after/before", "apply s"],
        formats={
            "target params after/before": ".3f",
            "target FLOPs after/before": ".3f",
            "apply s": ".2f",
        },
    )
    tm = timed_applies(model, compared, sample, reps, "bert apply")
    for name in compared:
        params, flops = target_ratios(get_manifest(tm.results[name]))
        t.add(name, params, flops, tm.s(name))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "smoke check: 2 MiniLM specs, a 2-layer BERT, 1 round")
    ap.add_argument("--part", choices=("minilm", "bert", "all"), default="all")
    args = ap.parse_args(argv)
    rec = start("bench_budget", args, libraries=("transformers",))
    reps = 1 if args.quick else 3
    if args.part in ("minilm", "all"):
        minilm_part(rec, args.quick, reps)
    if args.part in ("bert", "all"):
        bert_part(rec, args.quick, reps)
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
