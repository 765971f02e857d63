"""Benchmark of the ``factorize`` transform (not part of the test suite).

    python benchmarks/bench_factorize.py            # the figures (about 7 minutes on 2 cores)
    python benchmarks/bench_factorize.py --quick    # smoke check (under a minute)
    python benchmarks/bench_factorize.py --explore  # instead: knobs, profile, alternatives
                                                    # (15-30 minutes; --quick too: 2 minutes)

Measured in one run, on this machine, with ``torch.set_num_threads(--threads)``:

1. Surgery of every Linear of a BERT-base-sized stack (12 x [q, k, v, o: 768x768,
   768->3072, 3072->768]) with trained-like weights (random orthogonal singular
   vectors, decaying spectra: a power law, and MiniLM's own spectra resampled to
   the BERT-base shapes), and of the real all-MiniLM-L6-v2, at ``param_ratio``
   0.5 and 0.25: wall time of ``surgery.plan`` and ``surgery.apply``, against a
   full SVD of every weight (``torch.linalg.svd``), all four interleaved, and the
   weight error of each layer against the optimal (Eckart-Young) error at its rank.
2. TensorLy-Torch ``FactorizedLinear.from_linear`` at the same parameter budget
   (its rank searched so that its weight parameter count is the closest to ours)
   on the Linears of one block: time (interleaved with ours) and error.
3. Forward latency of ``LowRankLinear`` (built by surgery) against the dense
   ``nn.Linear`` under ``torch.inference_mode`` (interleaved), next to the FLOP ratio.

``--explore`` writes the record ``bench_factorize_explore`` instead: E1 factorize's
knobs, E2 where ``apply`` spends its time, E3 SVD algorithms on one weight, E4
forward variants, E5 rank alignment.
"""

from __future__ import annotations

import copy
import cProfile
import functools
import math
import os
import pstats
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    convert,
    minilm,
    optimal_error,
    parser,
    quiet_warnings,
    rel_error,
    start,
    tl_weight,
    tt_caps,
    weight_with_spectrum,
)
from torch import nn

from tnsurgery import bench, surgery
from tnsurgery.decompositions import svd as tsvd
from tnsurgery.layers import LowRankLinear
from tnsurgery.surgery import get_manifest

KINDS = ("q", "k", "v", "o", "fc1", "fc2")
MINILM_KINDS = {  # stack kind -> MiniLM module suffix in encoder.layer.N
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in)
TOKENS = [128, 512, 2048]


def spec_for(ratio: float, **extra) -> dict:
    """Factorize every Linear at ``param_ratio``."""
    rule = {"match": "**", "types": ["Linear"], "transform": "factorize"}
    return {"version": 1, "rules": [{**rule, "params": {"param_ratio": ratio, **extra}}]}


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def svdvals64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.linalg.svdvals(m.weight.detach().double()) for n, m in linears(model).items()}


# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    """One BERT-like block: q, k, v, o (d x d), fc1 (d -> ff), fc2 (ff -> d)."""

    def __init__(self, d: int = 768, ff: int = 3072, heads: int = 12):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(x)))


class Stack(nn.Module):
    """A BERT-base-sized encoder stack (Linears only; no norms or embeddings)."""

    def __init__(self, n_layers: int = 12, d: int = 768, ff: int = 3072):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, ff) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def minilm_spectra(model: nn.Module) -> dict[tuple[int, str], np.ndarray]:
    """Singular values of MiniLM's weights, per (layer, stack kind)."""
    mods = dict(model.named_modules())
    res = {}
    for i in range(len(model.encoder.layer)):
        for kind, suffix in MINILM_KINDS.items():
            w = mods[f"encoder.layer.{i}.{suffix}"].weight.detach().double()
            res[(i, kind)] = torch.linalg.svdvals(w).numpy()
    return res


def spectrum(kind: str, layer: int, k: int, how: str, minilm_sv=None, n_src_layers=6):
    """A decaying spectrum of length ``k``.

    ``powerlaw``: s_i = (1 + i)^-0.5 (s_i² ~ 1/i: about 80% of the energy in the top
    quarter of the ranks, like MiniLM's attention weights). ``minilm``: the singular
    values of the MiniLM weight of the same kind (layer ``layer // 2``), resampled
    to length ``k`` at the same relative index.
    """
    if how == "powerlaw":
        return (1.0 + np.arange(k)) ** -0.5
    src = minilm_sv[(min(layer * n_src_layers // 12, n_src_layers - 1), kind)]
    return np.interp(np.linspace(0, 1, k), np.linspace(0, 1, len(src)), src)


def trained_like_stack(n_layers: int, how: str, seed: int = 0, minilm_sv=None) -> Stack:
    """A stack whose weights are U diag(s) Vᵀ with random orthogonal U, V and a decaying s."""
    g = torch.Generator().manual_seed(seed)
    model = Stack(n_layers)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            for kind in KINDS:
                lin: nn.Linear = getattr(block, kind)
                m, n = lin.weight.shape
                s = torch.from_numpy(spectrum(kind, i, min(m, n), how, minilm_sv)).float()
                w = weight_with_spectrum(m, n, s, g)
                lin.weight.copy_(w * (math.sqrt(m * n / 3) / float(w.norm())) / math.sqrt(n))
                lin.bias.uniform_(-0.02, 0.02, generator=g)
    return model.eval()


# ----------------------------------------------------------------------------- 1. surgery


def full_svd_all(weights: list[torch.Tensor], tall: bool = False) -> None:
    """The naive way to the optimal factors: a full (thin) SVD of every weight.
    ``tall``: on the tall orientation (transpose the wide ones first; LAPACK is faster)."""
    for w in weights:
        a = w.mT if (tall and w.shape[0] < w.shape[1]) else w
        torch.linalg.svd(a, full_matrices=False)


def error_ratios(small: nn.Module, sv64: dict[str, torch.Tensor]) -> list[dict]:
    """Per replaced layer: rank, our weight error, the optimal one, their ratio, method."""
    rows = []
    for rep in get_manifest(small)["replacements"]:
        rank = rep["resolved"]["rank"]
        opt = optimal_error(sv64[rep["name"]], rank)
        ours = rep["weight_error"]
        rows.append(
            {
                "name": rep["name"],
                "rank": rank,
                "ours": ours,
                "optimal": opt,
                "ratio": ours / opt if opt > 0 else 1.0,
                "method": rep["resolved"].get("method", "?"),
            }
        )
    return rows


def surgery_rows(rec: bench.Record, models: dict[str, nn.Module], ratios, reps: int) -> None:
    """Part 1: plan, apply and the two full SVDs, interleaved, per model and ratio."""
    t = rec.table(
        "surgery",
        "1. Surgery of every Linear vs a full SVD of every weight (seconds)",
        (
            "model | param_ratio | Linears | params after/before | plan s | apply s |"
            " plan+apply s | full SVD s | full SVD (tall) s | apply / SVD | plan+apply / SVD |"
            " apply / SVD (tall) | plan+apply / SVD (tall) | SVD method chosen | err/opt max |"
            " err/opt mean"
        ),
        formats={"params after/before": ".3f", "err/opt max": ".4f", "err/opt mean": ".4f"},
    )
    layers, worst = [], None
    for name, model in models.items():
        sv = svdvals64(model)
        weights = [m.weight.detach() for m in linears(model).values()]
        before = sum(p.numel() for p in model.parameters())
        for ratio in ratios:
            spec = spec_for(ratio)
            tm = bench.interleave(
                {
                    "plan": lambda model=model, spec=spec: surgery.plan(model, spec),
                    "apply": lambda model=model, spec=spec: surgery.apply(model, spec),
                    "svd": lambda w=weights: full_svd_all(w),
                    "svd_tall": lambda w=weights: full_svd_all(w, tall=True),
                },
                reps,
                warmup=0,
                label=f"surgery {name} {ratio}",
            )
            small = tm.results["apply"]
            rows = error_ratios(small, sv)
            methods: dict[str, int] = {}
            for r in rows:
                methods[r["method"]] = methods.get(r["method"], 0) + 1
            hi = max(rows, key=lambda r: r["ratio"])
            err_max, err_mean = hi["ratio"], statistics.fmean(r["ratio"] for r in rows)
            if worst is None or err_max > worst[0]:
                worst = (err_max, hi["name"], name, ratio)
            both = ("plan", "apply")
            t.add(
                name,
                ratio,
                len(rows),
                sum(p.numel() for p in small.parameters()) / before,
                tm.s("plan"),
                tm.s("apply"),
                tm.total(both),
                tm.s("svd"),
                tm.s("svd_tall"),
                tm.ratio("apply", "svd"),
                tm.ratio(both, "svd"),
                tm.ratio("apply", "svd_tall"),
                tm.ratio(both, "svd_tall"),
                ", ".join(f"{k} {v}" for k, v in sorted(methods.items())),
                err_max,
                err_mean,
            )
            layers += [{"model": name, "param_ratio": ratio, **r} for r in rows]
            if name == "stack (power law)":
                for what, num in (("apply", "apply"), ("plan+apply", both)):
                    tall, naive = float(tm.ratio(num, "svd_tall")), float(tm.ratio(num, "svd"))
                    t.goal(
                        f"{what} in a fraction (< 1) of a full SVD's time (tall orientation)",
                        tall < 1,
                        f"stack, param_ratio {ratio}: {what} {tall:.2f}x the full SVD of every "
                        f"weight on the tall orientation ({naive:.2f}x the naive one)",
                    )
            t.goal(
                "max error <= 1.03x optimal",
                err_max <= 1.03,
                f"{name}, param_ratio {ratio}: {err_max:.4f}x optimal",
            )
    t.note(
        f"worst layer: {worst[1]} of {worst[2]} at param_ratio {worst[3]} "
        f"(error {worst[0]:.4f}x optimal)"
    )
    t.note(
        "ratios are per interleaved round (plan, apply and both SVDs once each per round); "
        "the goal lines use the tall SVD, the stronger baseline"
    )
    rec.data["surgery_layers"] = layers


# ----------------------------------------------------------------------------- 2. tltorch


def tltorch_rank_for(linear: nn.Linear, factorization: str, budget: int):
    """TensorLy-Torch rank whose weight parameter count is the closest to ``budget``.

    A float rank ('fraction of the parameters') moves every mode rank at once, in
    steps too coarse for Tucker (up to 2x in parameters), so the best float found
    on a grid is then refined one mode rank at a time (explicit rank tuple).
    Returns ``(rank, count)``.
    """
    from tltorch.factorized_tensors.core import TensorizedTensor
    from tltorch.utils import get_tensorized_shape

    out_f, in_f = linear.weight.shape
    tin, tout = get_tensorized_shape(in_f, out_f, order=3, min_dim=2, verbose=False)
    # BlockTT: the TT-SVD that initializes it caps each inner rank at the smaller side
    # of that unfolding (e.g. 16 after the first (4x4) core), whatever rank is asked
    caps = tt_caps([o * i for o, i in zip(tout, tin, strict=True)])

    def make_raw(r):
        return TensorizedTensor.new((tout, tin), rank=r, factorization=factorization)

    def make(r):
        if factorization == "blocktt":
            r = tuple(min(a, c) for a, c in zip(make_raw(r).rank, caps, strict=True))
        return make_raw(r)

    def count(r) -> int:
        return sum(p.numel() for p in make(r).parameters())

    if factorization == "cp":  # a single rank: the float grid is exact enough
        best = min((x / 1000 for x in range(1, 1500)), key=lambda r: abs(count(r) - budget))
        return best, count(best)
    below = [r for r in (x / 500 for x in range(1, 750)) if count(r) <= budget]
    rank = list(make(max(below, key=count)).rank)
    free = range(len(rank)) if factorization == "tucker" else range(1, len(rank) - 1)
    while True:  # grow the mode rank that adds the most while staying within budget
        steps = []
        for i in free:
            cand = [*rank]
            if factorization == "blocktt" and cand[i] >= caps[i]:
                continue
            cand[i] += 1
            steps.append((count(tuple(cand)), cand))
        fits = [(c, r) for c, r in steps if c <= budget]
        if not steps:
            break
        if not fits:
            over = min(steps, key=lambda cr: cr[0])
            if abs(over[0] - budget) < abs(count(tuple(rank)) - budget):
                rank = over[1]
            break
        rank = max(fits, key=lambda cr: cr[0])[1]
    return tuple(rank), count(tuple(rank))


def tltorch_rows(t: bench.Table, name: str, block: nn.Module, ratio: float, facs, reps: int):
    """Ours (surgery.apply on ``block``) vs TensorLy-Torch on the same Linears, the
    conversions interleaved round by round."""
    import tltorch

    spec = spec_for(ratio)
    small = surgery.apply(block, spec)  # untimed: the budget tltorch's ranks follow
    man = {r["name"]: r for r in get_manifest(small)["replacements"]}
    new = dict(small.named_modules())
    lins = linears(block)
    ours_params = sum(sum(p.numel() for p in new[n].parameters()) for n in lins)
    budgets = {n: new[n].rank * (new[n].in_features + new[n].out_features) for n in lins}
    opt = [
        optimal_error(
            torch.linalg.svdvals(lin.weight.detach().double()), man[n]["resolved"]["rank"]
        )
        for n, lin in lins.items()
    ]
    ranks = {
        f: {n: tltorch_rank_for(lin, f, budgets[n])[0] for n, lin in lins.items()} for f in facs
    }

    def tl_all(fac: str) -> dict[str, nn.Module]:
        return {
            n: tltorch.FactorizedLinear.from_linear(lin, rank=ranks[fac][n], factorization=fac)
            for n, lin in lins.items()
        }

    fns = {"ours": lambda: surgery.apply(block, spec)}
    fns.update({f: functools.partial(tl_all, f) for f in facs})
    with quiet_warnings():
        tm = bench.interleave(fns, reps, warmup=0, label=f"tltorch {name} {ratio}")
    ours_err = statistics.fmean(man[n]["weight_error"] for n in lins)
    for fac in facs:
        made = tm.results[fac]
        with torch.no_grad():
            errs = {n: rel_error(tl_weight(made[n], lin), lin.weight) for n, lin in lins.items()}
        tl_params = sum(p.numel() for m in made.values() for p in m.parameters())
        worst = min(errs[n] / man[n]["weight_error"] for n in lins)
        speed = tm.ratio(fac, "ours")
        t.add(
            name,
            ratio,
            fac,
            len(lins),
            ours_params,
            tl_params,
            tl_params / ours_params,
            tm.s("ours"),
            tm.s(fac),
            speed,
            statistics.fmean(opt),
            ours_err,
            statistics.fmean(errs.values()),
            worst,
        )
        t.goal(
            ">= 10x faster than tltorch at no worse error",
            float(speed) >= 10 and worst >= 1,
            f"vs tltorch {fac} ({name}, {ratio}): {float(speed):.1f}x faster, tltorch error "
            f">= ours on every layer: {worst >= 1}",
        )


def tltorch_cp_note(t: bench.Table, linear: nn.Linear) -> None:
    """CP at this budget has a rank in the thousands: time a single ALS sweep."""
    import tltorch

    small = convert(copy.deepcopy(linear), "factorize", {"param_ratio": 0.5})
    rank, count = tltorch_rank_for(
        linear, "cp", small.rank * (linear.in_features + linear.out_features)
    )
    with quiet_warnings():
        secs, fl = bench.time_once(
            lambda: tltorch.FactorizedLinear.from_linear(
                linear, rank=rank, factorization="cp", decomposition_kwargs={"n_iter_max": 1}
            ),
            label="tltorch cp one sweep",
        )
    with torch.no_grad():
        err = rel_error(tl_weight(fl, linear), linear.weight)
    t.note(
        f"CP ('cp'), MiniLM encoder.layer.0 query {linear.out_features}x{linear.in_features} at "
        f"param_ratio 0.5: CP rank {fl.rank} ({count} params); ONE ALS sweep (n_iter_max=1; "
        f"tensorly's default is 100) took {secs:.2f} s and leaves error {err:.3f} (ours: "
        f"{rel_error(small.to_dense(), linear.weight):.3f})"
    )


# ----------------------------------------------------------------------------- 3. forward


def time_forward(fns: dict, x: torch.Tensor, runs: int, label: str) -> bench.Timings:
    """``fn(x)`` for each, interleaved, under inference_mode, after 5 warmup rounds."""
    with torch.inference_mode():
        return bench.interleave(
            {k: functools.partial(f, x) for k, f in fns.items()}, runs, warmup=5, label=label
        )


def factorized_linear(in_f: int, out_f: int, ratio: float, seed: int = 0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f).eval()
    lr = convert(dense, "factorize", {"param_ratio": ratio})
    assert isinstance(lr, LowRankLinear), type(lr)
    return dense, lr.eval()


def forward_rows(t: bench.Table, ratios, runs: int) -> None:
    over = []
    for out_f, in_f in SHAPES:
        for ratio in ratios:
            dense, lr = factorized_linear(in_f, out_f, ratio)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_f)
                tm = time_forward({"dense": dense, "lr": lr}, x, runs, f"forward {out_f}x{in_f}")
                dflops = 2 * tokens * in_f * out_f
                lflops = lr.flops((tokens, in_f))
                ratio_t, flop_ratio = tm.ratio("lr", "dense"), lflops / dflops
                over.append((float(ratio_t) / flop_ratio, f"{out_f}x{in_f}", lr.rank, tokens))
                t.add(
                    f"{out_f}x{in_f}",
                    ratio,
                    lr.rank,
                    tokens,
                    tm.ms("dense"),
                    tm.ms("lr"),
                    ratio_t,
                    flop_ratio,
                    float(ratio_t) / flop_ratio,
                    dflops / tm.s("dense").median / 1e9,
                    lflops / tm.s("lr").median / 1e9,
                )
    worst = max(over)
    t.note(
        f"worst time/FLOP ratio: {worst[0]:.3f} ({worst[1]}, rank {worst[2]}, {worst[3]} "
        f"tokens); median {statistics.median(o[0] for o in over):.3f}"
    )
    n_ok = sum(o[0] <= 1.15 for o in over)
    t.goal(
        "forward within 1.15x of the FLOP ratio",
        n_ok == len(over),
        f"forward: {n_ok}/{len(over)} configurations within 1.15x of the FLOP ratio "
        f"(worst {worst[0]:.2f}x)",
    )


def figures(rec: bench.Record, args) -> None:
    quick = args.quick
    n_layers, reps = (2, 1) if quick else (12, 3)
    ratios = [0.5] if quick else [0.5, 0.25]
    runs = 10 if quick else 30
    rec.note(
        f"stack: {n_layers} x [4 x Linear(768,768), Linear(768,3072), Linear(3072,768)]; "
        f"surgery timings: {reps} interleaved round(s); forward: {runs}"
    )
    _, real = minilm()
    stacks = {"stack (power law)": trained_like_stack(n_layers, "powerlaw", seed=0)}
    if not quick:
        stacks["stack (MiniLM spectra)"] = trained_like_stack(
            n_layers, "minilm", seed=1, minilm_sv=minilm_spectra(real)
        )
    surgery_rows(rec, {**stacks, "all-MiniLM-L6-v2": real}, ratios, reps)

    t = rec.table(
        "tltorch",
        "2. TensorLy-Torch FactorizedLinear.from_linear at the same parameter budget",
        (
            "Linears of | param_ratio | tltorch factorization | Linears | ours params |"
            " tltorch params | tltorch/ours params | ours apply s | tltorch from_linear s |"
            " tltorch/ours time | optimal err (mean) | ours err (mean) | tltorch err (mean) |"
            " tltorch/ours err (min over layers)"
        ),
        formats={"tltorch/ours params": ".3f"},
    )
    try:
        import tltorch  # noqa: F401
    except ImportError as exc:
        t.note(f"not run: {exc} (pip install tensorly tensorly-torch)")
    else:
        for ratio in ratios:
            block = copy.deepcopy(stacks["stack (power law)"].layers[0])
            if quick:  # only the q and fc2 Linears
                block = nn.ModuleDict({"q": block.q, "fc2": block.fc2})
            tltorch_rows(t, "stack (power law), block 0", block, ratio, ["tucker", "blocktt"], reps)
            if not quick:
                layer0 = copy.deepcopy(real.encoder.layer[0])
                name = "all-MiniLM-L6-v2, encoder.layer.0"
                tltorch_rows(t, name, layer0, ratio, ["tucker", "blocktt"], reps)
        if not quick:
            tltorch_cp_note(t, real.encoder.layer[0].attention.self.query)

    t = rec.table(
        "forward",
        f"3. Forward latency, LowRankLinear vs nn.Linear (float32, inference_mode, "
        f"{runs} interleaved rounds)",
        (
            "weight (out x in) | param_ratio | rank | tokens | dense ms | low-rank ms |"
            " time ratio | FLOP ratio | time/FLOP ratio | dense GFLOP/s | low-rank GFLOP/s"
        ),
    )
    forward_rows(t, [0.5, 0.25], runs)


# ----------------------------------------------------------------------------- exploration


def explore_knobs(rec: bench.Record, models: dict[str, nn.Module], reps: int) -> None:
    """E1: apply() time / full SVD (tall) time and max error / optimal, per setting."""
    settings = [
        ("default (method=auto)", {}),
        ("method=exact", {"method": "exact"}),
        ("method=gram", {"method": "gram"}),
    ]
    for niter in (1, 2, 3, 4):
        for ov in (8, 16, 32):
            params = {"method": "randomized", "niter": niter, "oversample": ov}
            settings.append((f"randomized niter={niter} ov={ov}", params))
    cells: dict[str, dict[str, str]] = {label: {} for label, _ in settings}
    columns = []
    for name, model in models.items():
        sv = svdvals64(model)
        weights = [m.weight.detach() for m in linears(model).values()]
        for ratio in (0.5, 0.25):
            col = f"{name} {ratio}"
            columns.append(col)
            fns = {"svd": lambda w=weights: full_svd_all(w, tall=True)}
            for label, params in settings:
                spec = spec_for(ratio, **params)
                fns[label] = lambda model=model, spec=spec: surgery.apply(model, spec)
            tm = bench.interleave(fns, reps, warmup=0, label=f"E1 {col}")
            for label, _ in settings:
                worst = max(r["ratio"] for r in error_ratios(tm.results[label], sv))
                cells[label][col] = f"{float(tm.ratio(label, 'svd')):.3f} / {worst:.4f}"
    t = rec.table(
        "e1",
        "E1. factorize params (each cell: apply time / full SVD (tall) time, median of "
        "per-round ratios / max error / optimal)",
        ["params", *columns],
    )
    for label, _ in settings:
        t.add(label, *(cells[label][c] for c in columns))


def explore_profile(rec: bench.Record, model: nn.Module, n_layers: int) -> None:
    """E2: where apply() spends its time (cProfile cumulative times of its stages)."""
    prof = cProfile.Profile()
    spec = spec_for(0.5)
    secs, _ = bench.time_once(lambda: prof.runcall(surgery.apply, model, spec), "E2 profile")
    stats = pstats.Stats(prof)
    stages = [  # (label, a substring of the file defining it, function name)
        ("copy.deepcopy of the model", f"{os.sep}copy.py", "deepcopy"),
        ("torch.fx trace", "tnsurgery", "trace"),
        ("sharing (tied/alias scan)", "tnsurgery", "sharing"),
        ("factorize plan (all layers)", "factorize", "plan"),
        ("  of which SVD", "factorize", "svd"),
        ("    of which gram_svd", "tnsurgery", "gram_svd"),
        ("    of which randomized_svd", "tnsurgery", "randomized_svd"),
        ("    of which exact_svd", "tnsurgery", "exact_svd"),
        ("factorize build (factors -> LowRankLinear)", "factorize", "build"),
        ("weight error (to_dense, float64)", "tnsurgery", ("weight_error", "_weight_error")),
        (
            "relative_error, all calls (plan's prediction + weight error)",
            "tnsurgery",
            "relative_error",
        ),
        ("manifest", "tnsurgery", "_manifest"),
    ]
    t = rec.table(
        "e2",
        f"E2. Where apply() spends its time ({n_layers}-layer stack, param_ratio 0.5, cProfile)",
        ["stage", "s", "share"],
        formats={"share": ".1%"},
    )
    for label, where, func in stages:
        cum = 0.0
        for (file, _line, fn), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
            if fn in (func if isinstance(func, tuple) else (func,)) and where in file:
                if func == "deepcopy":  # top-level calls only (it recurses)
                    ct = sum(v[3] for k, v in callers.items() if not k[0].endswith("copy.py"))
                cum += ct
        t.add(label, cum, cum / secs)
    t.add("total apply (profiled, so slower)", secs, 1.0)


def _svd_candidates(w: torch.Tensor, rank: int) -> dict[str, object]:
    """Ways to the top-``rank`` factors of one weight (tnsurgery's own where it has them)."""
    m, n = w.shape
    wt = w.mT if m < n else w
    cands = {
        "LAPACK as given": lambda: _usv(torch.linalg.svd(w, full_matrices=False)),
        "Gram f32": lambda: tsvd.gram_svd(w, rank),
        "Gram f64": lambda: tsvd.gram_svd(w.double(), rank),
        "eigvalsh only": lambda: torch.linalg.eigvalsh(wt.mT @ wt),
        "svdvals only (tall)": lambda: torch.linalg.svdvals(wt),
    }
    for niter in (1, 2, 4):
        cands[f"randomized niter {niter}"] = lambda niter=niter: tsvd.randomized_svd(
            w, min(rank + 16, min(m, n)), niter, 0
        )
    return cands


def _usv(usvh):
    """LAPACK's ``U, S, Vh`` as ``U, S, V``."""
    u, s, vh = usvh
    return u, s, vh.mT


def _truncated_error(res, w: torch.Tensor, rank: int, opt: float) -> str:
    if not isinstance(res, tuple):
        return ""
    u, s, v = res
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    return f" / {rel_error((u * s) @ v.mT, w) / opt:.6f}"


def explore_svd(rec: bench.Record, weights: dict[str, torch.Tensor], reps: int) -> None:
    """E3: each algorithm's time / LAPACK's on the tall orientation, and its error / optimal."""
    labels = list(_svd_candidates(torch.zeros(4, 4), 1))
    t = rec.table(
        "e3",
        "E3. One weight, each algorithm (time / LAPACK SVD on the tall orientation, median of "
        "per-round ratios / error / optimal)",
        ["weight, rank", *labels],
    )
    for ratio in (0.5, 0.25):
        for name, w in weights.items():
            m, n = w.shape
            wt = w.mT if m < n else w
            rank = math.floor((ratio * (m * n + m) - m) / (m + n))
            opt = optimal_error(torch.linalg.svdvals(w.double()), rank)
            fns = {"ref": lambda wt=wt: torch.linalg.svd(wt, full_matrices=False)}
            fns.update(_svd_candidates(w, rank))
            tm = bench.interleave(fns, reps, warmup=1, label=f"E3 {name}")
            t.add(
                f"{name} {m}x{n}, r {rank}",
                *(
                    f"{float(tm.ratio(k, 'ref')):.2f}"
                    + _truncated_error(tm.results[k], w, rank, opt)
                    for k in labels
                ),
            )


def _forward_variants(lr: LowRankLinear) -> dict[str, object]:
    r, in_f, out_f = lr.rank, lr.in_features, lr.out_features
    vt = lr.v.detach().mT.contiguous()  # (in, r)
    ut = lr.u.detach().mT.contiguous()  # (r, out)
    b = lr.bias.detach()
    pad = -(-r // 64) * 64
    vpad = torch.zeros(pad, in_f)
    vpad[:r] = lr.v.detach()
    upad = torch.zeros(out_f, pad)
    upad[:, :r] = lr.u.detach()
    return {
        "LowRankLinear (F.linear x2)": lr,
        "x @ Vt @ Ut + b (pre-transposed)": lambda x: torch.addmm(b, x @ vt, ut),
        f"F.linear x2, rank padded to {pad}": lambda x: F.linear(F.linear(x, vpad), upad, b),
    }


def explore_forward(rec: bench.Record, runs: int) -> None:
    """E4: why a thin GEMM pair may miss its FLOP ratio: variants of the same product."""
    t = rec.table(
        "e4",
        "E4. Forward variants at param_ratio 0.5",
        ["weight", "rank", "tokens", "variant", "time ratio", "FLOP ratio", "time/FLOP"],
    )
    for out_f, in_f in SHAPES:
        dense, lr = factorized_linear(in_f, out_f, 0.5)
        variants = _forward_variants(lr)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f)
            tm = time_forward({"dense": dense, **variants}, x, runs, f"E4 {out_f}x{in_f}")
            flop_ratio = lr.rank * (in_f + out_f) / (in_f * out_f)
            for label in variants:
                r = tm.ratio(label, "dense")
                t.add(
                    f"{out_f}x{in_f}", lr.rank, tokens, label, r, flop_ratio, float(r) / flop_ratio
                )


def explore_alignment(rec: bench.Record, runs: int, quick: bool) -> None:
    """E5: time/FLOP ratio of LowRankLinear for ranks around the ones param_ratio gives."""
    cases = [
        (768, 768, [88, 95, 96, 128, 176, 191, 192]),
        (3072, 768, [152, 153, 160, 304, 306, 320]),
        (768, 3072, [152, 153, 160, 304, 307, 320]),
    ]
    if quick:
        cases = [(768, 768, [95, 96])]
    t = rec.table(
        "e5",
        "E5. Rank alignment (LowRankLinear time / dense time / FLOP ratio)",
        ["weight", "rank", "FLOP ratio", *(f"{n} tokens" for n in TOKENS)],
        formats={f"{n} tokens": ".3f" for n in TOKENS},
    )
    for out_f, in_f, ranks in cases:
        dense = nn.Linear(in_f, out_f).eval()
        layers = {f"rank {r}": LowRankLinear(in_f, out_f, r).eval() for r in ranks}
        cells: dict[int, list[float]] = {r: [] for r in ranks}
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f)
            tm = time_forward({"dense": dense, **layers}, x, runs, f"E5 {out_f}x{in_f}")
            for r in ranks:
                flop_ratio = r * (in_f + out_f) / (in_f * out_f)
                cells[r].append(float(tm.ratio(f"rank {r}", "dense")) / flop_ratio)
        for r in ranks:
            t.add(f"{out_f}x{in_f}", r, r * (in_f + out_f) / (in_f * out_f), *cells[r])


def explore(rec: bench.Record, args) -> None:
    quick = args.quick
    reps, runs = (1, 10) if quick else (3, 30)
    _, real = minilm()
    sv_src = minilm_spectra(real)
    power = trained_like_stack(2, "powerlaw", seed=0)
    spectra = trained_like_stack(2, "minilm", seed=1, minilm_sv=sv_src)
    models = {"power law": power, "MiniLM spectra": spectra, "MiniLM (real)": real}
    if quick:
        models = {"power law": power}
    explore_knobs(rec, models, reps)
    n_layers = 2 if quick else 12
    explore_profile(rec, trained_like_stack(n_layers, "powerlaw", seed=0), n_layers)
    weights = {
        f"stack {k}": getattr(power.layers[0], k).weight.detach() for k in ("q", "fc1", "fc2")
    }
    if not quick:
        weights.update(
            {
                f"MiniLM-spectra {k}": getattr(spectra.layers[0], k).weight.detach()
                for k in ("q", "fc1", "fc2")
            }
        )
    explore_svd(rec, weights, 3 if quick else 5)
    explore_forward(rec, runs)
    explore_alignment(rec, runs, quick)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "reduced run (< 1 minute; with --explore about 2 minutes)")
    ap.add_argument(
        "--explore",
        action="store_true",
        help="instead: factorize knobs, apply() stage profile, SVD and forward variants",
    )
    args = ap.parse_args(argv)
    name = "bench_factorize_explore" if args.explore else "bench_factorize"
    rec = start(name, args, libraries=("tensorly", "tensorly-torch"))
    (explore if args.explore else figures)(rec, args)
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
