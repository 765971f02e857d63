"""Tensor layers: forward latency vs the dense layer, per path (first part of issue 4's bench).

For TTLinear and TuckerLinear made by surgery from trained-like BERT-sized
weights, at several ranks and batches: the dense layer's time, each forward
path's time (contraction, rebuild-and-matmul), which path ``auto`` picks,
and the FLOP ratio of the contraction. Goals (issue 4): within 1.3x of dense
when the rebuild is FLOP-optimal, faster than dense when the contraction has
fewer FLOPs.

    python benchmarks/bench_tensor.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from tnsurgery import surgery


def trained_like(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.6)
    return (u * s) @ v.T


def median_ms(fn, x, repeats: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, inference_mode\n"
    )
    print(
        "| layer | shape | params kept | batch | dense ms | contract ms | rebuild ms | auto picks "
        "| auto / dense | contract FLOPs / dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in ((3072, 768), (768, 3072)):
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(trained_like(out_f, in_f, 0))
        model = nn.Sequential(lin).eval()
        for transform, params in (
            ("tt", {"param_ratio": 0.05, "d": 3}),
            ("tt", {"param_ratio": 0.25, "d": 3}),
            ("tucker", {"param_ratio": 0.25, "d": 2}),
        ):
            spec = {"rules": [{"match": "0", "transform": transform, "params": params}]}
            layer = surgery.apply(model, spec)[0]
            kept = sum(p.numel() for p in layer.parameters()) / sum(
                p.numel() for p in lin.parameters()
            )
            for batch in (512, 2048):
                x = torch.randn(batch, in_f)
                dense = median_ms(lin, x)
                times = {}
                for path in ("contract", "dense"):
                    layer.path = path
                    times[path] = median_ms(layer, x)
                layer.path = "auto"
                with torch.inference_mode():
                    layer(x)  # fills the dense cache if auto rebuilds
                picked = layer.choose_path(batch, cached=layer.has_dense_cache())
                auto = median_ms(layer, x)
                flops = (
                    layer.contraction_flops(batch) if hasattr(layer, "contraction_flops") else None
                )
                ratio = "-" if flops is None else f"{flops / (2 * batch * in_f * out_f):.3f}"
                print(
                    f"| {type(layer).__name__} {params} | {out_f}x{in_f} | {kept:.3f} | {batch} "
                    f"| {dense:.2f} | {times['contract']:.2f} | {times['dense']:.2f} | {picked} "
                    f"| {auto / dense:.2f} | {ratio} |"
                )


if __name__ == "__main__":
    main()
