"""Tensor layers (issue 4's bench): forward paths vs dense, and ours vs TensorLy-Torch.

1. ``paths``: for TTLinear and TuckerLinear made by surgery from trained-like
   BERT-sized weights, at several ranks and batches: the dense layer's time,
   each forward path's time (contraction, rebuild-and-matmul), which path
   ``auto`` picks, and the FLOP ratio of the contraction. Goals (issue 4):
   within 1.3x of dense when the rebuild is FLOP-optimal, faster than dense
   when the contraction has fewer FLOPs.
2. ``tltorch``: per layer and transform, ours (``surgery.apply``) against
   TensorLy-Torch's ``FactorizedLinear.from_linear`` / ``FactorizedConv.from_conv``
   at the same parameter count: conversion time, relative weight error, weight
   parameters, and forward latency of both against the dense layer. Linear
   3072x768 and 768x3072 (``tt`` vs tltorch ``blocktt``, its TT-matrix;
   ``tucker`` vs ``tucker``, on the same modes and ranks as ours) and a ResNet
   Conv2d 256->256 3x3 on 8x256x14x14 (``tucker``, ``cp``; tltorch ``tt``
   alone, since ours has no TT conv). Goal (issue 4): conversion >= 10x faster
   than tltorch at no worse error.

Every time is a median over repeated runs, interleaved between the compared
sides so that a background load hits both alike; forward under
``torch.inference_mode`` after warmup runs.

    python benchmarks/bench_tensor.py                   # both parts (a few minutes, 2 cores)
    python benchmarks/bench_tensor.py --part tltorch    # one part: paths | tltorch | all
    python benchmarks/bench_tensor.py --quick           # small sizes, smoke check (< 1 minute)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


# ----------------------------------------------------------------------------- 1. paths


def forward_paths(
    shapes=((3072, 768), (768, 3072)), batches=(512, 2048), repeats: int = 20
) -> None:
    """Part 1: TT/Tucker forward paths vs the dense layer (see the module docstring)."""
    print(
        "| layer | shape | params kept | batch | dense ms | contract ms | rebuild ms | auto picks "
        "| auto / dense | contract FLOPs / dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(trained_like(out_f, in_f, 0))
        model = nn.Sequential(lin).eval()
        for transform, params in (
            ("tt", {"param_ratio": 0.05, "d": 3}),
            ("tt", {"param_ratio": 0.25, "d": 3}),
            ("tt", {"ranks": 8, "d": 4}),  # the high compression of the TT literature
            ("tt", {"ranks": 4, "d": 3}),
            ("tucker", {"param_ratio": 0.25, "d": 2}),
        ):
            spec = {"rules": [{"match": "0", "transform": transform, "params": params}]}
            layer = surgery.apply(model, spec)[0]
            kept = sum(p.numel() for p in layer.parameters()) / sum(
                p.numel() for p in lin.parameters()
            )
            for batch in batches:
                x = torch.randn(batch, in_f)
                dense = median_ms(lin, x, repeats)
                times = {}
                for path in ("contract", "dense"):
                    layer.path = path
                    times[path] = median_ms(layer, x, repeats)
                layer.path = "auto"
                with torch.inference_mode():
                    layer(x)  # fills the dense cache if auto rebuilds
                picked = layer.choose_path(batch, True)
                auto = median_ms(layer, x, repeats)
                if hasattr(layer, "contraction_plan"):  # TT: the cheapest grouping of cores
                    layer.path = "contract"
                    flops = layer.contraction_plan(batch).flops
                    layer.path = "auto"
                elif hasattr(layer, "contraction_flops"):
                    flops = layer.contraction_flops(batch)
                else:
                    flops = None
                ratio = "-" if flops is None else f"{flops / (2 * batch * in_f * out_f):.3f}"
                print(
                    f"| {type(layer).__name__} {params} | {out_f}x{in_f} | {kept:.3f} | {batch} "
                    f"| {dense:.2f} | {times['contract']:.2f} | {times['dense']:.2f} | {picked} "
                    f"| {auto / dense:.2f} | {ratio} |"
                )


# ----------------------------------------------------------------------------- 2. tltorch

TL_IMPLS = ("reconstructed", "factorized")  # tltorch forward implementations; the first is
# the default of from_linear / from_conv (FactorizedLinear's own constructor defaults to
# "factorized")


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each zero-argument ``fn`` over ``runs`` rounds, one call of every
    fn per round (interleaved)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_conversions(
    fns: dict[str, Callable[[], nn.Module]], reps: int, budget_s: float
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Median seconds of each conversion (interleaved, up to ``reps`` runs each; a side
    stops repeating once its runs add up to ``budget_s``) and the last layer each made."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    made: dict[str, nn.Module] = {}
    for _ in range(reps):
        for k, fn in fns.items():
            if times[k] and sum(times[k]) >= budget_s:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tensorly's rank/SVD size notices
                t0 = time.perf_counter()
                made[k] = fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, made


def time_forward(
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    runs: int,
    warmup: int,
) -> dict[str, float]:
    """Median milliseconds of each ``fn(x)`` under inference_mode, interleaved."""
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        med = interleaved_medians({k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}, runs)
    return {k: v * 1e3 for k, v in med.items()}


def ours_convert(module: nn.Module, transform: str, params: dict) -> nn.Module:
    spec = {"rules": [{"match": "0", "transform": transform, "params": params}]}
    return surgery.apply(nn.Sequential(module), spec)[0]


def bias_numel(module: nn.Module) -> int:
    b = getattr(module, "bias", None)
    return b.numel() if isinstance(b, torch.Tensor) else 0


def ours_weight_params(layer: nn.Module, source: nn.Module) -> int:
    """Parameters of our layer, its bias (the source's) excluded."""
    return sum(p.numel() for p in layer.parameters()) - bias_numel(source)


def tl_weight_params(tl_layer: nn.Module) -> int:
    """Parameters of a tltorch layer's factorized weight (CP's weights vector included)."""
    return sum(p.numel() for p in tl_layer.weight.parameters())


def tl_weight(tl_layer: nn.Module, source: nn.Module) -> torch.Tensor:
    """The dense weight a tltorch layer represents, in the source layer's layout."""
    import tltorch

    if isinstance(tl_layer, tltorch.FactorizedLinear):
        return tl_layer.weight.to_matrix().reshape(source.weight.shape)
    t = tl_layer.weight.to_tensor()
    if isinstance(tl_layer.weight, tltorch.TTTensor):  # its TT conv holds (in, kh, kw, out)
        t = t.movedim(-1, 0)
    return t.reshape(source.weight.shape)


def reference_forward(module: nn.Module, weight: torch.Tensor, bias, x: torch.Tensor):
    """What a layer with this dense ``weight`` (and ``module``'s geometry) computes."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def check_forward(name: str, layer: nn.Module, module, weight, bias, x, tol: float = 1e-3):
    """Assert that ``layer(x)`` is the layer of its rebuilt ``weight``: the timed forward
    computes what the error column measures."""
    with torch.inference_mode():
        y = layer(x)
        ref = reference_forward(module, weight, bias, x)
    err = rel_error(y, ref)
    assert err <= tol, f"{name}: forward differs from its rebuilt weight's by {err:.2e}"
    return err


def tl_unfeasible(tl_layer: nn.Module, impl: str, x: torch.Tensor) -> str | None:
    """Why a tltorch forward cannot run here (a first intermediate over 1 GiB), if it cannot.

    Its factorized Tucker Linear is one ``torch.einsum`` over the input, the core and
    every factor; without opt_einsum, torch contracts the operands left to right, and
    the input and the core share no index: their outer product comes first."""
    import tltorch

    if (
        impl == "factorized"
        and isinstance(tl_layer, tltorch.FactorizedLinear)
        and isinstance(tl_layer.weight, tltorch.TuckerTensorized)
        and not torch.backends.opt_einsum.is_available()
    ):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        size = rows * x.shape[-1] * tl_layer.weight.core.numel() * x.element_size()
        if size < 2**30:
            return None
        return (
            "its single einsum needs opt_einsum (not installed): contracted left to right, "
            f"the input x core outer product alone is {size / 2**30:.0f} GiB"
        )
    return None


def tt_count(shape, ranks) -> int:
    """Parameters of a TT with cores ``(r_k, shape_k, r_{k+1})``."""
    return sum(ranks[k] * shape[k] * ranks[k + 1] for k in range(len(shape)))


def tt_caps(sizes) -> list[int]:
    """Largest useful TT ranks (TT-SVD never exceeds them): 1, min of the unfolding's
    sides at each bond, 1."""
    inner = [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]
    return [1, *inner, 1]


def closest_uniform_tt(sizes, budget: int) -> tuple[tuple[int, ...], int]:
    """TT ranks ``(1, r, .., r, 1)`` (capped per bond) whose parameter count is the closest
    to ``budget``; ``sizes`` are the cores' middle sizes (a TT-matrix: ``o_k * i_k``)."""
    caps = tt_caps(sizes)
    best = None
    for r in range(1, max(caps) + 1):
        ranks = tuple(min(r, c) for c in caps)
        n = tt_count(sizes, ranks)
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (ranks, n)
        if n > budget:
            break
    return best


def closest_tucker(shape, budget: int) -> tuple[tuple[int, ...], int]:
    """Tucker ranks, each the same fraction of its mode (rounded, >= 1), whose parameter
    count (core + factor matrices) is the closest to ``budget``."""
    best = None
    for step in range(1, 1001):
        ranks = tuple(max(1, min(n, round(step / 1000 * n))) for n in shape)
        n = math.prod(ranks) + sum(a * b for a, b in zip(shape, ranks, strict=True))
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (ranks, n)
    return best


def tl_linear_setup(layer: nn.Module, lin: nn.Linear, fac: str) -> tuple[dict, str]:
    """Keyword arguments of ``FactorizedLinear.from_linear`` at our layer's budget.

    Our TT and Tucker Linears have the same structure as tltorch's BlockTT and
    tensorized Tucker (modes ``(out_1..out_d, in_1..in_d)``), so on the same modes
    our ranks give the same parameter count. When ours zero-padded the weight (the
    factors' products exceed the layer), tltorch cannot: it gets its own modes and
    the uniform rank closest to our count."""
    out_f, in_f = lin.weight.shape
    if math.prod(layer.in_factors) == in_f and math.prod(layer.out_factors) == out_f:
        ins, outs, rank = tuple(layer.in_factors), tuple(layer.out_factors), tuple(layer.ranks)
        note = "our modes and ranks"
    else:
        from tltorch.utils import get_tensorized_shape

        ins, outs = get_tensorized_shape(
            in_f, out_f, order=len(layer.in_factors), min_dim=2, verbose=False
        )
        budget = ours_weight_params(layer, lin)
        if len(ins) < 2 or len(outs) < 2:
            raise SkipCase(
                f"ours zero-padded the weight to {math.prod(layer.out_factors)}x"
                f"{math.prod(layer.in_factors)}; tltorch cannot pad and tensorizes "
                f"{out_f}x{in_f} to {outs}x{ins}: no tensor format to compare"
            )
        if fac == "blocktt":
            rank, n = closest_uniform_tt([o * i for o, i in zip(outs, ins, strict=True)], budget)
        else:
            rank, n = closest_tucker([*outs, *ins], budget)
        if not 0.8 <= n / budget <= 1.25:
            raise SkipCase(
                f"ours zero-padded the weight; on its own modes {outs}x{ins} tltorch's "
                f"closest count is {n} params, ours {budget}"
            )
        note = (
            f"ours padded to {math.prod(layer.out_factors)}x{math.prod(layer.in_factors)}: "
            f"tltorch on its own modes {outs}x{ins}, closest rank"
        )
    kwargs = {
        "auto_tensorize": False,  # else explicit features raise ValueError
        "in_tensorized_features": ins,
        "out_tensorized_features": outs,
        "factorization": fac,
        "rank": rank,
    }
    return kwargs, note


class SkipCase(Exception):
    """A comparison that cannot be made fairly (the reason is the message)."""


@dataclass
class Case:
    """One row: a source layer, our transform (None: tltorch only) and tltorch's."""

    layer: str
    module: nn.Module
    x: torch.Tensor
    transform: str | None
    params: dict | None
    tl_fac: str


@dataclass
class TlRow:
    layer: str
    label: str
    dense_params: int
    ours_params: int | None = None
    tl_params: int | None = None
    ours_s: float | None = None
    tl_s: float | None = None
    ours_err: float | None = None
    tl_err: float | None = None
    dense_ms: float = float("nan")
    ours_ms: float | None = None
    ours_path: str = "-"
    tl_ms: dict[str, float] = field(default_factory=dict)
    rank: str = ""
    notes: list[str] = field(default_factory=list)


def run_case(case: Case, reps: int, budget_s: float, runs: int, warmup: int) -> TlRow:
    import tltorch

    mod = case.module.eval()
    row = TlRow(case.layer, "", mod.weight.numel())
    is_linear = isinstance(mod, nn.Linear)
    ours = None
    if case.transform is not None:  # our layer first (untimed): tltorch's rank follows it
        ours = ours_convert(mod, case.transform, case.params)
        row.ours_params = ours_weight_params(ours, mod)

    tl_kwargs: dict = {"factorization": case.tl_fac}
    if is_linear:
        kw, note = tl_linear_setup(ours, mod, case.tl_fac)
        tl_kwargs.update(kw)
        row.notes.append(note)
    elif case.tl_fac == "tucker":  # Tucker-2, as ours: spatial modes kept whole
        r_out, r_in = ours.ranks
        tl_kwargs.update(rank=(r_out, r_in, *mod.kernel_size), fixed_rank_modes="spatial")
        row.notes.append("tltorch's full-rank spatial factor matrices add kh²+kw² params")
    elif case.tl_fac == "cp":
        tl_kwargs.update(rank=ours.rank, decomposition_kwargs={"random_state": 0})
        row.notes.append("same CP rank; tltorch also keeps the R weights λ")
    else:  # tltorch-only TT conv: its (in, kh, kw, out) TT at the closest uniform rank
        budget = case.params["budget"]
        shape = (mod.in_channels, *mod.kernel_size, mod.out_channels)
        tl_kwargs.update(rank=closest_uniform_tt(shape, budget)[0])
        row.notes.append(f"budget: {budget} weight params, the tucker row's")

    def tl_convert():
        if is_linear:
            return tltorch.FactorizedLinear.from_linear(mod, **tl_kwargs)
        return tltorch.FactorizedConv.from_conv(mod, decompose_weights=True, **tl_kwargs)

    fns: dict[str, Callable[[], nn.Module]] = {"tl": tl_convert}
    if case.transform is not None:
        fns = {"ours": lambda: ours_convert(mod, case.transform, case.params), **fns}
    times, made = time_conversions(fns, reps, budget_s)
    tl = made["tl"].eval()
    row.tl_s = times["tl"]
    row.tl_params = tl_weight_params(tl)
    w = mod.weight.detach()
    with torch.no_grad():
        w_tl = tl_weight(tl, mod)
        row.tl_err = rel_error(w_tl, w)
    rank = tl.weight.rank
    row.rank = f"tltorch rank {tuple(rank) if not isinstance(rank, int) else rank}"
    if ours is not None:
        ours = made["ours"].eval()
        row.ours_s = times["ours"]
        with torch.no_grad():
            w_ours = ours.to_dense()
            row.ours_err = rel_error(w_ours, w)
        check_forward(f"ours {case.transform}", ours, mod, w_ours, mod.bias, case.x)
        ranks = getattr(ours, "ranks", None) or getattr(ours, "rank", None)
        row.rank = f"ours {type(ours).__name__} {ranks}; {row.rank}"
    row.label = (
        f"{case.transform} vs {case.tl_fac}"
        if case.transform is not None
        else f"{case.tl_fac} (tltorch only)"
    )

    # tltorch forward: its default implementation and the other one, on the same weight
    tl_layers = {}
    for impl in TL_IMPLS:
        reason = tl_unfeasible(tl, impl, case.x)
        if reason:
            row.notes.append(f"tltorch {impl} forward not timed: {reason}")
            continue
        if is_linear:  # a second layer on the same factorized weight and bias
            tl_layers[impl] = tltorch.FactorizedLinear(
                tl.in_tensorized_features,
                tl.out_tensorized_features,
                bias=False,
                factorization=tl.weight,
                implementation=impl,
            ).eval()
            tl_layers[impl].bias = tl.bias
        else:
            tl_layers[impl] = tltorch.FactorizedConv.from_factorization(
                tl.weight,
                implementation=impl,
                stride=mod.stride[0],
                padding=mod.padding,
                dilation=mod.dilation,
                bias=tl.bias,
            ).eval()
        check_forward(f"tltorch {case.tl_fac} {impl}", tl_layers[impl], mod, w_tl, tl.bias, case.x)

    fwd = {"dense": mod}
    if ours is not None:
        fwd["ours"] = ours
    fwd.update({f"tl {impl}": m for impl, m in tl_layers.items()})
    ms = time_forward(fwd, case.x, runs, warmup)
    row.dense_ms = ms["dense"]
    if ours is not None:
        row.ours_ms = ms["ours"]
        if hasattr(ours, "choose_path"):
            rows = case.x.reshape(-1, case.x.shape[-1]).shape[0]
            row.ours_path = ours.choose_path(rows, cached=ours.has_dense_cache())
            if row.ours_path == "dense" and ours.has_dense_cache():
                row.ours_path = "dense (cached)"
        else:
            row.ours_path = "factorized"
    row.tl_ms = {impl: ms[f"tl {impl}"] for impl in tl_layers}
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def refusal(module: nn.Module, transform: str, params: dict) -> str:
    """Why our surgery refuses ``transform`` on ``module`` (its error message)."""
    try:
        ours_convert(module, transform, params)
    except Exception as exc:  # noqa: BLE001 - the message is the point
        return f"{type(exc).__name__}: {exc}"
    return "accepted (unexpected)"


def vs_tltorch(quick: bool = False) -> list[TlRow]:
    """Part 2: ours vs TensorLy-Torch at the same parameter count (module docstring)."""
    import tensorly
    import tltorch

    print(f"tensorly {tensorly.__version__}, tltorch {tltorch.__version__}\n")
    if quick:
        lin_shapes, tokens = [(1024, 256), (256, 1024)], 128
        c, conv_x = 64, (2, 64, 14, 14)
        reps, budget_s, runs, warmup = 1, 5.0, 5, 2
    else:
        lin_shapes, tokens = [(3072, 768), (768, 3072)], 512
        c, conv_x = 256, (8, 256, 14, 14)
        reps, budget_s, runs, warmup = 3, 20.0, 20, 3
    cp_fraction = 0.125  # of the dense kernel's params, for the CP rank

    # warm up both libraries' first-call costs (imports, tensorly backend) untimed
    small = nn.Linear(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_convert(small, "tt", {"rank": 2, "d": 2})
        tltorch.FactorizedLinear.from_linear(small, factorization="tucker", rank=0.5)
        sconv = nn.Conv2d(8, 8, 3)
        ours_convert(sconv, "cp", {"rank": 2})
        tltorch.FactorizedConv.from_conv(sconv, rank=2, factorization="cp")

    cases: list[Case] = []
    for i, (out_f, in_f) in enumerate(lin_shapes):
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(trained_like(out_f, in_f, i))
        x = torch.randn(tokens, in_f)
        name = f"Linear {out_f}x{in_f}, {tokens} tokens"
        cases.append(Case(name, lin, x, "tt", {"param_ratio": 0.1, "d": 3}, "blocktt"))
        cases.append(Case(name, lin, x, "tucker", {"param_ratio": 0.25, "d": 2}, "tucker"))
    conv = nn.Conv2d(c, c, 3, padding=1)
    with torch.no_grad():
        k = trained_like(c, c * 9, 7).reshape(c, c, 3, 3)
        conv.weight.copy_(k * (1.0 / (3 * c * 9)) ** 0.5 / k.std())  # a Kaiming-like scale
    x = torch.randn(*conv_x)
    cname = f"Conv2d {c}->{c} 3x3 pad 1, x {'x'.join(map(str, conv_x))}"
    cp_rank = max(1, round(cp_fraction * conv.weight.numel() / (2 * c + 6)))
    cases.append(Case(cname, conv, x, "tucker", {"param_ratio": 0.25}, "tucker"))
    cases.append(Case(cname, conv, x, "cp", {"rank": cp_rank}, "cp"))

    rows, skipped = [], []
    for case in cases:
        t0 = time.perf_counter()
        try:
            row = run_case(case, reps, budget_s, runs, warmup)
        except SkipCase as exc:
            skipped.append(f"{case.layer}, {case.transform} vs {case.tl_fac}: skipped, {exc}")
            print(f"  ({skipped[-1]})", flush=True)
            continue
        rows.append(row)
        print(f"  ({case.layer}: {row.label} done in {time.perf_counter() - t0:.1f} s)", flush=True)
        if case.layer == cname and case.transform == "tucker":
            # tltorch's TT conv alone (ours has none), at the budget of our Tucker conv
            t0 = time.perf_counter()
            tt_case = Case(cname, conv, x, None, {"budget": row.ours_params}, "tt")
            try:
                rows.append(run_case(tt_case, reps, budget_s, runs, warmup))
            except Exception as exc:  # noqa: BLE001 - report, don't hide the other rows
                print(f"  tltorch tt on Conv2d failed: {type(exc).__name__}: {exc}")
            else:
                print(f"  ({cname}: tt, tltorch only, done in {time.perf_counter() - t0:.1f} s)")

    print(
        f"\n## 2. Ours vs TensorLy-Torch at the same parameter count (CPU, "
        f"{torch.get_num_threads()} threads, float32; conversion: median of up to {reps} runs, "
        "a side stops repeating "
        f"past {budget_s:.0f} s; forward: inference_mode, median of {runs} interleaved runs "
        f"after {warmup} warmups)\n"
    )
    print(
        "| layer | transform (ours vs tltorch) | dense params | ours params | tltorch params "
        "| tltorch/ours params | ours convert s | tltorch convert s "
        "| convert speedup (tltorch/ours) | ours err | tltorch err | tltorch/ours err "
        "| dense ms | ours ms | ours path "
        "| tltorch ms (reconstructed, default) | tltorch ms (factorized) | ours/dense "
        "| tltorch rec./dense | tltorch fact./dense |"
    )
    print("|" + "---|" * 20)
    for r in rows:
        pr = r.tl_params / r.ours_params if r.ours_params else None
        sp = r.tl_s / r.ours_s if r.ours_s else None
        er = r.tl_err / r.ours_err if r.ours_err else None
        od = ratio(r.ours_ms, r.dense_ms)
        rec, fac = r.tl_ms.get("reconstructed"), r.tl_ms.get("factorized")
        print(
            f"| {r.layer} | {r.label} | {r.dense_params} | {fmt(r.ours_params, 'd')} "
            f"| {fmt(r.tl_params, 'd')} | {fmt(pr, '.4f')} | {fmt(r.ours_s)} | {fmt(r.tl_s)} "
            f"| {fmt(sp, '.1f')} | {fmt(r.ours_err, '.4f')} | {fmt(r.tl_err, '.4f')} "
            f"| {fmt(er, '.4f')} | {r.dense_ms:.2f} | {fmt(r.ours_ms, '.2f')} | {r.ours_path} "
            f"| {fmt(rec, '.2f')} | {fmt(fac, '.2f')} | {fmt(od, '.2f')} "
            f"| {fmt(ratio(rec, r.dense_ms), '.2f')} | {fmt(ratio(fac, r.dense_ms), '.2f')} |"
        )
    print("\nRanks and notes:")
    for r in rows:
        print(f"- {r.layer}, {r.label}: {r.rank}; {'; '.join(r.notes)}")
    for line in skipped:
        print(f"- {line}")
    lin0, conv0 = cases[0].module, conv
    print(
        f"- Linear, tltorch cp: not compared (our cp is Conv2d only; ours refuses: "
        f"{refusal(lin0, 'cp', {'rank': 8})})"
    )
    print(f"- Conv2d, tt: tltorch alone (ours refuses: {refusal(conv0, 'tt', {'rank': 8})})")
    print(
        "- tltorch 'tt' on a Linear is its TT-matrix 'blocktt' ('tt' raises ValueError for "
        "FactorizedLinear); from_linear/from_conv default to implementation='reconstructed' "
        "(rebuild the weight every call); ours caches the rebuilt weight in inference when "
        "'auto' picks the dense path."
    )

    print("\n## Goal check (from this run)")
    for r in rows:
        if r.ours_s is None:
            continue
        speed, er = r.tl_s / r.ours_s, r.tl_err / r.ours_err
        no_worse = r.ours_err <= r.tl_err * (1 + 1e-4)
        ok = "met" if speed >= 10 and no_worse else "MISSED"
        tl_fwd = " / ".join(f"{v / r.dense_ms:.2f}x ({k})" for k, v in r.tl_ms.items())
        print(
            f"- {r.layer}, {r.label}: ours converts {speed:.1f}x as fast as tltorch, error "
            f"tltorch/ours {er:.4f} (ours no worse: {'yes' if no_worse else 'NO'}) "
            f"[goal >= 10x at no worse error: {ok}]; forward vs dense: ours "
            f"{r.ours_ms / r.dense_ms:.2f}x, tltorch {tl_fwd}; ours / tltorch's fastest: "
            f"{r.ours_ms / min(r.tl_ms.values()):.2f}x"
        )
    return rows


# ----------------------------------------------------------------------------- main


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), vals[3] + vals[4]  # total, idle + iowait (clock ticks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("paths", "tltorch", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes and repeats (smoke check)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start, c_start, cpu_start = time.perf_counter(), time.process_time(), _cpu_times()
    print(
        f"# bench_tensor --part {args.part}{' --quick' if args.quick else ''}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"inference_mode; load average at start {os.getloadavg()[0]:.2f}\n"
    )
    if args.part in ("paths", "all"):
        print("## 1. Forward paths of TTLinear / TuckerLinear vs dense\n")
        if args.quick:
            forward_paths(shapes=((1024, 256),), batches=(128,), repeats=5)
        else:
            forward_paths()
        print()
    if args.part in ("tltorch", "all"):
        vs_tltorch(args.quick)
    cpu_end = _cpu_times()
    wall = time.perf_counter() - t_start
    if cpu_start is not None and cpu_end is not None:
        busy = (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])
        others = busy / os.sysconf("SC_CLK_TCK") - (time.process_time() - c_start)
        share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        print(f"\nother processes used {share:.0%} of all cores during the run", end="")
    print(
        f"\ntotal time {wall:.0f} s; load average at end {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
