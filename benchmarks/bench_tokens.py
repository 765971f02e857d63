"""Benchmark of low-rank speed against the token count (not part of the test suite).

    python benchmarks/bench_tokens.py                  # the figures (about 3 minutes on 2 cores)
    python benchmarks/bench_tokens.py --quick          # smoke check (under a minute)
    python benchmarks/bench_tokens.py --device cuda    # on a GPU (record bench_tokens_cuda)

Low rank is faster only where the product is compute-bound. Measured with the very
function ``tnsurgery bench`` runs (``tnsurgery.speed.measure``: each replacement
built by ``surgery.apply``, then timed against its dense original, interleaved,
under ``torch.inference_mode``, medians), at 1 and 16 tokens (decode) and 512 and
4096 tokens (prefill), on ``torch.set_num_threads(--threads)``:

1. a 4096x4096 ``nn.Linear`` (a 7B-class model's attention projection) factorized
   at ``param_ratio`` 0.25 (25 % of its FLOPs: rank 511), and with ``rank_multiple``
   64 (rank 512);
2. a BERT-base feed-forward ``nn.Linear`` 768->3072 at ``param_ratio`` 0.5 (rank
   306), and with ``rank_multiple`` 64 (rank 320).

Each row gives the dense and the factorized time per call, their ratio next to the
FLOP ratio, and the time ratio over the FLOP ratio (1.0: the factorized layer runs
its FLOPs as fast as the dense one; above: it runs them slower). The weights are
random (time does not depend on their values). Before each measurement the harness
waits for idle cores (``tnsurgery.bench``); the others' share of the cores during
each is in the stamp.
"""

from __future__ import annotations

import sys

import torch
from common import parser, start
from torch import nn

from tnsurgery import bench, speed, surgery

TOKENS = (1, 16, 512, 4096)
QUICK_TOKENS = (1, 16, 512)
CASES = [  # label, (in, out), param_ratio
    ("4096x4096", (4096, 4096), 0.25),
    ("768->3072 (BERT-base fc1)", (768, 3072), 0.5),
]
MULTIPLES = (None, 64)


def surgered(in_f: int, out_f: int, ratio: float, multiple: int | None, dtype: torch.dtype):
    """A one-Linear model and its factorization (as ``tnsurgery bench`` builds it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, dtype=dtype)).eval()
    params = {"param_ratio": ratio}
    if multiple is not None:
        params["rank_multiple"] = multiple
    rule = {"match": "0", "transform": "factorize", "params": params}
    small = surgery.apply(model, {"version": 1, "rules": [rule]}, torch.randn(1, in_f, dtype=dtype))
    return model, small


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "tokens 1, 16, 512 only and the minimum rounds (< 1 minute)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16")
    args = ap.parse_args(argv)
    device = speed.resolve_device(args.device)
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    name = "bench_tokens" if device.type == "cpu" else "bench_tokens_cuda"
    rec = start(name, args)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    budget = 0.0 if args.quick else 1.0
    rec.note(
        f"{speed.measure.__module__}.measure on {device} ({dtype_name}), tokens "
        f"{', '.join(map(str, tokens))}; at least 5 interleaved rounds per pair and token "
        f"count, more for {budget:g} s; times per call (medians)."
    )
    ratios = rec.table(
        "ratios",
        "Factorized time / dense time at each token count (FLOP ratio for comparison)",
        ["layer", "rank", "FLOP ratio", *(f"{n} tok" for n in tokens)],
        formats={"FLOP ratio": ".3f", **{f"{n} tok": ".3f" for n in tokens}},
    )
    times = rec.table(
        "times",
        "Times per call",
        ["layer", "rank", "tokens", "dense ms", "factorized ms", "time ratio", "time/FLOP"],
        formats={"time ratio": ".3f", "time/FLOP": ".2f"},
    )
    data = []
    for label, (in_f, out_f), ratio in CASES:
        for multiple in MULTIPLES:
            model, small = surgered(in_f, out_f, ratio, multiple, dtype)
            bench.wait_idle()
            tag = f"{label}, multiple {multiple}"
            with bench.watch(tag):
                report = speed.measure(model, small, tokens, device=device, budget_s=budget)
            (ts,) = report.targets
            rank = ts.resolved["rank"]
            aligned = f"{rank} (rank_multiple {multiple})" if multiple else str(rank)
            ratios.add(label, aligned, ts.flop_ratio, *(tm.ratio for tm in ts.timings))
            for tm in ts.timings:
                per_flop = tm.ratio / tm.flop_ratio if tm.flop_ratio else None
                ms0, ms1 = tm.original_s * 1e3, tm.replacement_s * 1e3
                times.add(label, rank, tm.tokens, ms0, ms1, tm.ratio, per_flop)
            data.append(report.to_dict())
            print(f"  {tag}: " + ", ".join(f"{tm.tokens}: {tm.ratio:.3f}" for tm in ts.timings))
    ratios.note(
        "Above 1.000 the factorized layer is slower than the dense one: `tnsurgery bench` "
        "marks it, and a spec can exclude it or set `rank_multiple`."
    )
    rec.data["reports"] = data
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
