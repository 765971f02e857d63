"""What :func:`~tnsurgery.speed.measure` returns: per replaced target its timings (one per
token count), with totals per token count and the targets that got slower."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["HINT", "SpeedReport", "TargetSpeed", "Timing"]

HINT = (
    'exclude them in the spec (the rule\'s "exclude"), or give factorize a rank_multiple '
    "(8, 16, 32 or 64: aligned ranks recover GEMM efficiency)"
)


@dataclass
class Timing:
    """One layer pair timed on one input: median seconds per call of the original and
    of its replacement, and the FLOPs of each on that input.

    ``tokens`` is ``None`` for a layer timed on the plan's recorded input shape (not a
    Linear-like layer)."""

    tokens: int | None
    input_shape: tuple[int, ...]
    original_s: float
    replacement_s: float
    flops_before: int | None = None
    flops_after: int | None = None
    repeats: int = 0
    calls_per_repeat: int = 1

    @property
    def ratio(self) -> float:
        """Replacement time over original time (above 1: the replacement is slower)."""
        return self.replacement_s / self.original_s if self.original_s > 0 else math.inf

    @property
    def flop_ratio(self) -> float | None:
        """Replacement FLOPs over original FLOPs on this input (``None``: not counted)."""
        if not self.flops_before or self.flops_after is None:
            return None
        return self.flops_after / self.flops_before

    @property
    def slower(self) -> bool:
        """Whether the replacement took longer than the original."""
        return self.ratio > 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the keys of ``timings`` in :meth:`SpeedReport.to_dict`)."""
        d = {**asdict(self), "input_shape": list(self.input_shape), "ratio": self.ratio}
        return {**d, "flop_ratio": self.flop_ratio, "slower": self.slower}


@dataclass
class TargetSpeed:
    """One replaced module: what replaced it, and its timings (one per token count, or
    one on the recorded input shape); ``reason`` says why it was not timed."""

    name: str
    module_type: str
    replacement: str | None
    transforms: list[str]
    resolved: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    plan_flop_ratio: float | None = None
    timings: list[Timing] = field(default_factory=list)
    reason: str | None = None
    same_as: str | None = None  # the target of the same shapes whose timings these are

    @property
    def timed(self) -> bool:
        """Whether the target has timings."""
        return bool(self.timings)

    @property
    def flop_ratio(self) -> float | None:
        """The FLOP ratio measured on the timed inputs, else the plan's."""
        ratios = [t.flop_ratio for t in self.timings if t.flop_ratio is not None]
        return ratios[0] if ratios else self.plan_flop_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the keys of ``targets`` in :meth:`SpeedReport.to_dict`)."""
        d = asdict(self)
        d.update(transform="+".join(d.pop("transforms")), flop_ratio=self.flop_ratio)
        return {**d, "timed": self.timed, "timings": [t.to_dict() for t in self.timings]}


@dataclass
class SpeedReport:
    """Every replaced target's timings on one device, with totals per token count."""

    device: str
    device_name: str
    threads: int
    tokens: list[int]
    targets: list[TargetSpeed] = field(default_factory=list)

    def totals(self) -> list[dict[str, Any]]:
        """Per token count: the summed times of every target timed at it (each layer of
        the model counted, shared timings included), their ratio and the FLOP ratio."""
        rows = []
        for n in self.tokens:
            at = [t for ts in self.targets for t in ts.timings if t.tokens == n]
            if not at:
                continue
            before = sum(t.original_s for t in at)
            after = sum(t.replacement_s for t in at)
            counted = all(t.flops_before is not None and t.flops_after is not None for t in at)
            f0 = sum(t.flops_before for t in at) if counted else None
            f1 = sum(t.flops_after for t in at) if counted else None
            ratio = after / before if before > 0 else math.inf
            rows.append(
                {
                    "tokens": n,
                    "targets": len(at),
                    "original_s": before,
                    "replacement_s": after,
                    "ratio": ratio,
                    "flop_ratio": f1 / f0 if f0 else None,
                    "slower": ratio > 1.0,
                }
            )
        return rows

    def slower(self) -> dict[str, list[str]]:
        """The targets whose replacement was slower at every timed input (``every``) and
        at some but not all (``some``)."""
        every, some = [], []
        for ts in self.targets:
            flags = [t.slower for t in ts.timings]
            if flags and all(flags):
                every.append(ts.name)
            elif any(flags):
                some.append(ts.name)
        return {"every": every, "some": some}

    def slower_at(self, name: str) -> list[int | None]:
        """The token counts at which ``name``'s replacement was slower."""
        return [t.tokens for ts in self.targets if ts.name == name for t in ts.timings if t.slower]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``device``, ``device_name``, ``threads``, ``torch``, ``tokens``,
        ``targets`` (per target: ``name``, ``module_type``, ``replacement``,
        ``transform``, ``resolved``, ``dtype``, ``flop_ratio``, ``plan_flop_ratio``,
        ``timed``, ``reason``, ``same_as``, ``timings``: per input ``tokens``,
        ``input_shape``, ``original_s``, ``replacement_s``, ``ratio``, ``flops_before``,
        ``flops_after``, ``flop_ratio``, ``slower``, ``repeats``, ``calls_per_repeat``),
        ``totals`` (per token count: ``tokens``, ``targets``, ``original_s``,
        ``replacement_s``, ``ratio``, ``flop_ratio``, ``slower``) and ``slower``
        (``every``, ``some``: target names)."""
        return {
            "device": self.device,
            "device_name": self.device_name,
            "threads": self.threads,
            "torch": torch.__version__,
            "tokens": list(self.tokens),
            "targets": [t.to_dict() for t in self.targets],
            "totals": self.totals(),
            "slower": self.slower(),
        }
