"""Benchmark: one batched decomposition over same-shaped matrices against one per matrix
(not part of the test suite).

    python benchmarks/bench_batched.py                  # under a minute on 2 cores
    python benchmarks/bench_batched.py --quick          # smoke check
    python benchmarks/bench_batched.py --device cuda    # on a GPU (record bench_batched_cuda)

A transformer block holds several matrices of one shape (a Llama block: 4 attention
projections ``hidden²``, gate and up ``inter × hidden``). Factorizing them is a
truncated SVD each; the question is whether one batched call over the group (a
batched Gram product, one ``torch.linalg.eigh`` over the stack, a batched product for
the other side: ``tnsurgery.decompositions.svd.gram_svd`` given the stack) is faster
than calling it on one matrix at a time, as surgery does. Both compute the same factors (the
table checks it); the weights have a trained-like spectrum (``s_k ∝ (1+k)^-0.5``).
Times are medians of interleaved rounds, in float32 (what surgery decomposes in).
"""

from __future__ import annotations

import sys

import torch
from common import parser, start

from tnsurgery import bench, speed
from tnsurgery.decompositions.svd import gram_svd

CPU_GROUPS = [  # label, count, (rows, cols): a 1B-shaped Llama block's groups, and a small one
    ("attention 2048²", 4, (2048, 2048)),
    ("gate/up 5632×2048", 2, (5632, 2048)),
    ("BERT-base attention 768²", 4, (768, 768)),
    ("small 256²", 16, (256, 256)),
]
CUDA_GROUPS = [  # a 7B-shaped Llama block's groups
    ("attention 4096²", 4, (4096, 4096)),
    ("gate/up 11008×4096", 2, (11008, 4096)),
    ("BERT-base attention 768²", 4, (768, 768)),
    ("small 256²", 16, (256, 256)),
]


def trained_like(count: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """``count`` matrices ``U diag(s) Vᵀ`` with ``s_k ∝ (1+k)^-0.5`` and random bases."""
    g = torch.Generator().manual_seed(rows * 7 + cols)
    k = min(rows, cols)
    out = []
    for _ in range(count):
        u = torch.linalg.qr(torch.randn(rows, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(cols, k, generator=g)).Q
        s = (1 + torch.arange(k, dtype=torch.float32)) ** -0.5
        out.append((u * s) @ v.mT)
    return torch.stack(out).to(device)


def one_by_one(a: torch.Tensor, rank: int):
    """:func:`gram_svd` on each matrix of the stack in turn (what surgery does)."""
    return [gram_svd(m, rank) for m in a]


def error(a: torch.Tensor, factors) -> float:
    u, s, v = factors
    return float(torch.linalg.norm(a - (u * s) @ v.mT) / torch.linalg.norm(a))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "the small groups only (< 1 minute)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    device = speed.resolve_device(args.device)
    name = "bench_batched" if device.type == "cpu" else "bench_batched_cuda"
    rec = start(name, args)
    groups = CPU_GROUPS if device.type == "cpu" else CUDA_GROUPS
    if args.quick:
        groups = groups[2:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rec.note(
        f"Truncated SVD at a quarter of the full rank (Gram eigendecomposition, float32) on "
        f"{device}: each group decomposed one matrix at a time (`gram_svd`, what surgery "
        "does) and in one batched call per step, interleaved rounds, medians."
    )
    t = rec.table(
        "groups",
        "One matrix at a time against one batched call",
        ["group", "matrices", "one at a time s", "batched s", "batched / one at a time",
         "error one at a time", "error batched"],  # fmt: skip
        formats={"batched / one at a time": ".3f", "error one at a time": ".5f",
                 "error batched": ".5f"},  # fmt: skip
    )
    ratios = []
    for label, count, (rows, cols) in groups:
        a = trained_like(count, rows, cols, device)
        rank = min(rows, cols) // 4

        def seq(a=a, rank=rank):
            out = one_by_one(a, rank)
            sync()
            return out

        def bat(a=a, rank=rank):
            out = gram_svd(a, rank)  # the stack in one call per step
            sync()
            return out

        big = rows * cols >= 2048 * 2048
        timings = bench.interleave({"seq": seq, "bat": bat}, repeats=3 if big else 7, label=label)
        e_seq = max(error(m, f) for m, f in zip(a, timings.results["seq"], strict=True))
        u, s, v = timings.results["bat"]
        e_bat = max(error(a[i], (u[i], s[i], v[i])) for i in range(count))
        s_seq, s_bat = timings.ms("seq").median / 1e3, timings.ms("bat").median / 1e3
        ratios.append(s_bat / s_seq)
        t.add(label, count, s_seq, s_bat, s_bat / s_seq, e_seq, e_bat)
        print(f"  {label}: one at a time {s_seq:.3f} s, batched {s_bat:.3f} s", flush=True)
    t.note(
        "Below 1.000 the batched call is faster. torch's CUDA `linalg.eigh` runs a batch "
        "of matrices wider than 32 as a loop of single-matrix solver calls (the batched "
        "Jacobi solver only takes n <= 32), so batching can only gain the Gram and "
        "back-projection products, which are large GEMMs on their own."
    )
    faster = [g[0] for g, r in zip(groups, ratios, strict=True) if r < 0.9]
    t.note(
        "Groups where the batched call is at least 10 % faster here: "
        + (", ".join(faster) if faster else "none (surgery decomposes one matrix at a time)")
        + "."
    )
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
