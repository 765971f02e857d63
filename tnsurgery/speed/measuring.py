"""Measuring: token counts and the device checked, each replacement timed against the
module it replaced (:func:`measure`; the package docstring says how)."""

from __future__ import annotations

import copy
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from tnsurgery.decompositions.conv1d import linear_features
from tnsurgery.errors import UserInputError
from tnsurgery.flops import module_flops
from tnsurgery.manifest import get_manifest
from tnsurgery.plan import Plan, TargetPlan
from tnsurgery.speed.report import SpeedReport, TargetSpeed, Timing

__all__ = [
    "DEFAULT_TOKENS",
    "MAX_TOKENS",
    "check_tokens",
    "measure",
    "parse_tokens",
    "resolve_device",
    "time_pair",
]

DEFAULT_TOKENS = (1, 16, 512, 4096)  # decode (1, 16) and prefill (512, 4096)
MAX_TOKENS = 1_000_000
MIN_ROUNDS = 5  # timed rounds of every pair, whatever the budget
MAX_ROUNDS = 200
MIN_SAMPLE_S = 1e-3  # one timed sample lasts at least this long (calls repeated within it)
Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- inputs


def parse_tokens(text: str, what: str = "--tokens") -> list[int]:
    """Token counts from ``"1,16,512,4096"`` (each a whole number from 1 to
    :data:`MAX_TOKENS`; repeats dropped, order kept).

    Raises:
        UserInputError: a value that is not a whole number or out of range, named.
    """
    counts = []
    for item in str(text).split(","):
        item = item.strip()
        if not re.fullmatch(r"[0-9]{1,9}", item):
            raise UserInputError(
                f"{what}: {item!r} is not a token count (give whole numbers separated by "
                f"commas, e.g. {','.join(map(str, DEFAULT_TOKENS))})"
            )
        counts.append(int(item))
    return check_tokens(counts, what)


def check_tokens(tokens: Iterable[int], what: str = "tokens") -> list[int]:
    """``tokens`` as a list of distinct ints from 1 to :data:`MAX_TOKENS`.

    Raises:
        UserInputError: none given, or a value out of range (named).
    """
    counts: list[int] = []
    for n in tokens:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOKENS:
            raise UserInputError(
                f"{what}: {n!r} is out of range (a token count is a whole number from 1 to "
                f"{MAX_TOKENS:,})"
            )
        if n not in counts:
            counts.append(n)
    if not counts:
        raise UserInputError(f"{what}: no token count given")
    return counts


def resolve_device(device: str | torch.device) -> torch.device:
    """The device to time on (``cpu``, ``cuda`` or ``cuda:N``).

    Raises:
        UserInputError: an unknown device, or CUDA asked for where it is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError(f"device {device!r}: give cpu or cuda") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserInputError(f"device {device!r}: bench times on cpu or cuda")
    if not torch.cuda.is_available():
        raise UserInputError(
            f"device {device!r}: CUDA is not available on this machine (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'})"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserInputError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_pair(
    original: nn.Module,
    replacement: nn.Module,
    x: torch.Tensor,
    budget_s: float = 0.2,
    min_rounds: int = MIN_ROUNDS,
) -> tuple[float, float, int, int]:
    """Median seconds per call of ``original(x)`` and ``replacement(x)`` (both on
    ``x``'s device), timed in interleaved rounds after a warm-up; returns them with
    the rounds and the calls per timed sample."""
    sync = _sync(x.device)
    fns = (original, replacement)
    with torch.inference_mode():
        for _ in range(3 if x.device.type == "cuda" else 1):  # lazy init, kernel choice,
            for fn in fns:  # allocator (and a GPU's clocks)
                fn(x)
        sync()
        t0 = time.perf_counter()
        for fn in fns:
            fn(x)
        sync()
        once = max((time.perf_counter() - t0) / 2, 1e-9)
        number = max(1, min(10_000, math.ceil(MIN_SAMPLE_S / once)))
        samples: tuple[list[float], list[float]] = ([], [])
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or (
            rounds < MAX_ROUNDS and time.perf_counter() - start < budget_s
        ):
            order = (0, 1) if rounds % 2 == 0 else (1, 0)  # neither always goes first
            for i in order:
                fn = fns[i]
                sync()
                t = time.perf_counter()
                for _ in range(number):
                    fn(x)
                sync()
                samples[i].append((time.perf_counter() - t) / number)
            rounds += 1
    return statistics.median(samples[0]), statistics.median(samples[1]), rounds, number


def _units(original: nn.Module, plan: Plan) -> tuple[dict[str, list[TargetPlan]], list[TargetPlan]]:
    """The replaced targets grouped by the module of the original they stand in for
    (a later rule's target inside an earlier one's replacement joins it), and those
    with no such module (parts of a fused module split for the surgery)."""
    names = dict(original.named_modules())
    units: dict[str, list[TargetPlan]] = {}
    loose: list[TargetPlan] = []
    for tp in plan.replaced():
        home = next((u for u in units if tp.name == u or tp.name.startswith(u + ".")), None)
        if home is not None:
            units[home].append(tp)
        elif tp.name in names:
            inside = [u for u in units if u.startswith(tp.name + ".")]
            units[tp.name] = [t for u in inside for t in units.pop(u)] + [tp]
        else:
            loose.append(tp)
    return units, loose


def _signature(old: nn.Module, new: nn.Module, dtype: torch.dtype) -> str:
    """What decides a pair's times: the classes, tensor shapes and layer configs."""
    parts = []
    for m in (old, new):
        shapes = [(n, tuple(t.shape), str(t.dtype)) for n, t in m.state_dict().items()]
        cfg = m.config() if callable(getattr(m, "config", None)) else None
        parts.append([type(m).__qualname__, shapes, cfg])
    return json.dumps([parts, str(dtype)], default=str, sort_keys=True)


def _plan_flop_ratio(tps: list[TargetPlan]) -> float | None:
    if len(tps) != 1 or not tps[0].flops_before or tps[0].flops_after is None:
        return None
    return tps[0].flops_after / tps[0].flops_before


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` (a copy when it is elsewhere)."""
    ref = next(iter(module.parameters()), None)
    if ref is None or ref.device != device:
        module = copy.deepcopy(module).to(device)
    return module


def _time_target(
    ts: TargetSpeed,
    old: nn.Module,
    new: nn.Module,
    shapes: list[tuple[int | None, tuple[int, ...]]],
    device: torch.device,
    dtype: torch.dtype,
    budget_s: float,
) -> None:
    a, b = _on(old, device), _on(new, device)
    modes = [(m, m.training) for m in (*a.modules(), *b.modules())]
    a.eval(), b.eval()
    gen = torch.Generator().manual_seed(0)
    try:
        for tokens, shape in shapes:
            x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            t0, t1, rounds, number = time_pair(a, b, x, budget_s)
            ts.timings.append(
                Timing(
                    tokens=tokens,
                    input_shape=shape,
                    original_s=t0,
                    replacement_s=t1,
                    flops_before=module_flops(old, shape),
                    flops_after=module_flops(new, shape),
                    repeats=rounds,
                    calls_per_repeat=number,
                )
            )
    finally:
        for m, training in modes:
            m.training = training


def measure(
    original: nn.Module,
    surgered: nn.Module,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    *,
    device: str | torch.device = "cpu",
    plan: Plan | None = None,
    budget_s: float = 0.2,
    progress: Progress | None = None,
) -> SpeedReport:
    """Time every replacement of ``surgered`` against the module of ``original`` it
    replaced, at each token count (module docstring).

    Args:
        original: the model before surgery (left as it is).
        surgered: what :func:`~tnsurgery.surgery.apply` made of it (left as it is).
        tokens: token counts: each Linear-like pair runs on ``(tokens, in_features)``.
        device: ``cpu`` or ``cuda`` (``cuda:N``): layers elsewhere are copied there,
            one pair at a time, in the original layer's dtype.
        plan: the surgery's plan (default: the one in ``surgered``'s manifest).
        budget_s: seconds of timing per pair and input beyond the first
            :data:`MIN_ROUNDS` rounds.
        progress: called as ``progress(done, total, name)`` before each target.

    Raises:
        UserInputError: bad token counts or device, or ``surgered`` carries no plan.
    """
    dev = resolve_device(device)
    counts = check_tokens(tokens)
    if plan is None:
        recorded = (get_manifest(surgered) or {}).get("plan")
        if recorded is None:
            raise UserInputError(
                "the surgered model carries no plan: give the model tnsurgery.apply made"
            )
        plan = Plan.from_dict(recorded)
    report = SpeedReport(
        device=str(dev),
        device_name=_device_name(dev),
        threads=torch.get_num_threads(),
        tokens=counts,
    )
    units, loose = _units(original, plan)
    old_modules, new_modules = dict(original.named_modules()), dict(surgered.named_modules())
    seen: dict[str, TargetSpeed] = {}
    for done, (name, tps) in enumerate(units.items()):
        if progress:
            progress(done, len(units), name)
        old, new = old_modules[name], new_modules.get(name)
        ref = next((p for p in old.parameters() if p.is_floating_point()), None)
        ts = TargetSpeed(
            name=name,
            module_type=type(old).__name__,
            replacement=type(new).__name__ if new is not None else None,
            transforms=list(dict.fromkeys(tp.transform for tp in tps)),
            resolved=tps[0].resolved,
            dtype=str(ref.dtype).removeprefix("torch.") if ref is not None else None,
            plan_flop_ratio=_plan_flop_ratio(tps),
        )
        report.targets.append(ts)
        shapes, ts.reason = _shapes(old, new, tps[0], counts, ref)
        if ts.reason is not None:
            continue
        key = _signature(old, new, ref.dtype)
        if key in seen:
            ts.timings, ts.same_as = list(seen[key].timings), seen[key].name
            continue
        _time_target(ts, old, new, shapes, dev, ref.dtype, budget_s)
        seen[key] = ts
    for tp in loose:
        report.targets.append(
            TargetSpeed(
                name=tp.name,
                module_type=tp.module_type,
                replacement=None,
                transforms=[tp.transform],
                resolved=tp.resolved,
                reason="not a module of the original model (a part of a fused module, split "
                "for the surgery): not timed alone",
            )
        )
    if progress:
        progress(len(units), len(units), "")
    return report


def _shapes(
    old: nn.Module,
    new: nn.Module | None,
    tp: TargetPlan,
    tokens: list[int],
    ref: torch.Tensor | None,
) -> tuple[list[tuple[int | None, tuple[int, ...]]], str | None]:
    """The inputs to time a pair on, or why it is not timed."""
    if new is None:
        return [], "the surgered model has no module of this name"
    if ref is None:
        return [], "it has no floating-point weight"
    if new is old:
        return [], "the original model holds the replacement too (was it surgered in place?)"
    features = linear_features(old)
    if features is not None:
        return [(n, (n, features[0])) for n in tokens], None
    if tp.input_shape:
        return [(None, tuple(tp.input_shape))], None
    return [], (
        f"a {type(old).__name__} takes no token count and no input shape was recorded "
        "(give a sample input)"
    )


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine() or "cpu"
