"""Timing on a shared machine: waiting for idle cores, re-running noisy stretches,
interleaved rounds of every compared callable, medians with their spread."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIN_WINDOW = 0.2  # seconds: shorter stretches are below /proc/stat's resolution


# ----------------------------------------------------------------------------- noise


@dataclass
class Quiet:
    """Settings of the timing hygiene (module docstring); ``enabled=False`` turns it off."""

    enabled: bool = True
    threshold: float = 0.15  # wait until the machine is at most this busy ...
    window: float = 0.5  # ... measured over this many seconds ...
    max_wait: float = 60.0  # ... for at most this long
    max_others: float = 0.10  # re-run a stretch during which others used more of the cores
    attempts: int = 3  # re-runs per interleave() call


QUIET = Quiet()


@dataclass
class Noise:
    """What the hygiene saw since the last :class:`Record` was made."""

    shares: list[tuple[str, float]] = field(default_factory=list)  # (label, others' share)
    reruns: int = 0
    waits: list[float] = field(default_factory=list)  # busy share when a wait ended
    waited_s: float = 0.0

    def clear(self) -> None:
        """Forget everything seen so far."""
        self.shares.clear()
        self.waits.clear()
        self.reruns, self.waited_s = 0, 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready: others' share of the cores during the timed stretches (median, max),
        the re-runs, the waits, and the labels of stretches kept although noisy."""
        shares = [s for _, s in self.shares]
        return {
            "stretches": len(shares),
            "others_median": statistics.median(shares) if shares else None,
            "others_max": max(shares) if shares else None,
            "reruns": self.reruns,
            "waits": len(self.waits),
            "waited_s": round(self.waited_s, 1),
            "noisy": sorted({label for label, s in self.shares if s > QUIET.max_others}),
        }


NOISE = Noise()


def _cpu_jiffies() -> tuple[int, int] | None:
    """(total, idle + iowait) clock ticks of all cores since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), vals[3] + vals[4]


def machine_busy(window: float = 0.5) -> float | None:
    """Fraction of all cores busy over ``window`` seconds while this process sleeps."""
    a = _cpu_jiffies()
    time.sleep(window)
    b = _cpu_jiffies()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_idle() -> float | None:
    """Wait (up to ``QUIET.max_wait`` s) until other processes leave the cores idle
    (busy at most ``QUIET.threshold``); returns the busy share last seen."""
    if not QUIET.enabled:
        return None
    t0 = time.perf_counter()
    while True:
        busy = machine_busy(QUIET.window)
        if busy is None or busy <= QUIET.threshold or time.perf_counter() - t0 > QUIET.max_wait:
            NOISE.waited_s += time.perf_counter() - t0
            if busy is not None:
                NOISE.waits.append(busy)
            return busy


class watch:  # lower case: used like a function, ``with watch("label") as w``
    """Context manager: wall seconds of the block (``.seconds``) and the share of all
    cores that other processes used meanwhile (``.others``; None under 0.2 s or without
    /proc/stat). ``record`` adds the share to the run's noise log."""

    def __init__(self, label: str = "", record: bool = True) -> None:
        self.label, self.record = label, record
        self.seconds: float = float("nan")
        self.others: float | None = None

    def __enter__(self) -> watch:
        self._a, self._c = _cpu_jiffies(), time.process_time()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t
        b, a = _cpu_jiffies(), self._a
        if a is None or b is None or self.seconds < MIN_WINDOW:
            return
        busy = ((b[0] - a[0]) - (b[1] - a[1])) / os.sysconf("SC_CLK_TCK")
        own = time.process_time() - self._c
        self.others = max(0.0, busy - own) / (self.seconds * (os.cpu_count() or 1))
        if self.record:
            NOISE.shares.append((self.label, self.others))


def time_once(fn: Callable[[], Any], label: str = "") -> tuple[float, Any]:
    """Seconds and result of one call of ``fn`` (for steps that are not compared, e.g. a
    training run); the others' share of the cores meanwhile goes to the noise log."""
    with watch(label) as w:
        res = fn()
    return w.seconds, res


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements: min, max, quartiles, count."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        """The statistics of ``values`` (at least one)."""
        xs = sorted(float(v) for v in values)
        if not xs:
            raise ValueError("no values")
        med = statistics.median(xs)
        if len(xs) < 2:
            q1 = q3 = med
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(med, xs[0], xs[-1], q1, q3, len(xs))

    @property
    def iqr(self) -> float:
        """Interquartile range."""
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median (0 for a single value)."""
        return self.iqr / 2 / abs(self.median) if self.median else 0.0

    def scaled(self, k: float) -> Stats:
        """The same statistics multiplied by ``k`` (a unit change)."""
        return Stats(self.median * k, self.min * k, self.max * k, self.q1 * k, self.q3 * k, self.n)

    def __float__(self) -> float:
        return float(self.median)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready (the renderer recognizes a cell by its ``median`` key)."""
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
            "n": self.n,
        }


@dataclass
class Timings:
    """Seconds per round of each timed callable (rounds in order) and its last result."""

    samples: dict[str, list[float]]
    results: dict[str, Any] = field(default_factory=dict)

    def ms(self, name: str) -> Stats:
        """Median and spread of ``name`` in milliseconds."""
        return Stats.of(self.samples[name]).scaled(1e3)

    def s(self, name: str) -> Stats:
        """Median and spread of ``name`` in seconds."""
        return Stats.of(self.samples[name])

    def per_round(self, names: Hashable | list | tuple) -> list[float]:
        """Seconds per round of one callable, or of several (a list or tuple of names)
        summed round by round (over the rounds all of them ran)."""
        group = list(names) if isinstance(names, (list, tuple)) else [names]
        n = min(len(self.samples[k]) for k in group)
        return [sum(self.samples[k][i] for k in group) for i in range(n)]

    def total(self, names: Sequence[str]) -> Stats:
        """Median and spread, in seconds, of several callables' summed time per round."""
        return Stats.of(self.per_round(names))

    def ratio(self, num: Hashable | list | tuple, den: Hashable | list | tuple) -> Stats:
        """Time of ``num`` over time of ``den`` (each a name or names summed), computed
        within each round and summarized: the ratio of an interleaved pair."""
        a, b = self.per_round(num), self.per_round(den)
        n = min(len(a), len(b))
        return Stats.of(a[i] / b[i] for i in range(n))

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        """Milliseconds statistics of every callable, JSON-ready."""
        return {k: self.ms(k).to_dict() for k in self.samples}


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    *,
    budget_s: float | None = None,
    label: str = "",
) -> Timings:
    """Time the zero-argument callables ``fns`` round-robin: after ``warmup`` untimed
    rounds, ``repeats`` rounds each calling every callable once (the starting callable
    rotates from round to round), so that a background load or a drift hits every
    compared side alike. Ratios from :meth:`Timings.ratio` are per round.

    ``budget_s``: a callable stops repeating once its timed calls add up to that many
    seconds (it still runs at least once). With ``QUIET.enabled``, waits for idle
    cores first and re-runs a stretch of rounds that other processes disturbed
    (module docstring); ``label`` names the measurement in the noise log.
    """
    names = list(fns)
    if not names or repeats < 1:
        raise ValueError("interleave needs callables and repeats >= 1")
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for k in names:
            results[k] = fns[k]()
    samples: dict[str, list[float]] = {k: [] for k in names}
    wait_idle()
    done = attempts = 0
    while done < repeats:
        chunk: dict[str, list[float]] = {k: [] for k in names}
        rounds = 0
        with watch(label, record=False) as w:
            t_chunk = time.perf_counter()
            while True:
                r = done + rounds
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    ran = samples[k] + chunk[k]
                    if budget_s is not None and ran and sum(ran) >= budget_s:
                        continue
                    t0 = time.perf_counter()
                    results[k] = fns[k]()
                    chunk[k].append(time.perf_counter() - t0)
                rounds += 1
                if done + rounds >= repeats or time.perf_counter() - t_chunk >= MIN_WINDOW:
                    break
        noisy = w.others is not None and w.others > QUIET.max_others
        if QUIET.enabled and noisy and attempts < QUIET.attempts:
            attempts += 1
            NOISE.reruns += 1
            wait_idle()
            continue
        if w.others is not None:
            NOISE.shares.append((label, w.others))
        for k in names:
            samples[k].extend(chunk[k])
        done += rounds
    return Timings(samples, results)
