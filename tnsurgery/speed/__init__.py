"""Honest speed: each replacement a surgery made, timed against the module it replaced,
at the token counts a model serves.

Fewer FLOPs are faster only where a layer is compute-bound. A low-rank pair of thin
GEMMs at 25 % of a 4096-wide layer's FLOPs runs a prefill (thousands of tokens) at a
fraction of the dense time, but a decode step (1 to 16 tokens) is bound by kernel
launches and weight reads, and may be *slower* than the one dense GEMM it replaced.
:func:`measure` says which, per replacement and per token count:

    surgered = surgery.apply(model, spec, sample_input)
    report = speed.measure(model, surgered, tokens=(1, 16, 512, 4096), device="cuda")
    report.slower()   # {"every": [names slower at every count], "some": [...]}

It times the layers as built (by the caller's :func:`~tnsurgery.surgery.apply`, with
everything the spec asks: calibration, budget, sequential refit), not an estimate.
Each layer pair runs alone on an input of ``(tokens, in_features)`` (Linear-like
layers: ``nn.Linear``, Hugging Face's ``Conv1D``) or, for other layers, of the input
shape the plan recorded, in the original layer's dtype, on ``device``. Timing:
warm-up calls first, then interleaved rounds (original, replacement; replacement,
original; ...) under ``torch.inference_mode``, each sample long enough for the
clock (several calls when one is short; on CUDA synchronized before and after), the
median of at least ``MIN_ROUNDS`` (5) rounds, more while ``budget_s`` lasts. Layers
of the same shape, dtype and replacement (the same projection in every block) are
timed once and their timings shared (``same_as``).
"""

from tnsurgery.speed.measuring import (
    DEFAULT_TOKENS,
    MAX_TOKENS,
    check_tokens,
    measure,
    parse_tokens,
    resolve_device,
    time_pair,
)
from tnsurgery.speed.report import HINT, SpeedReport, TargetSpeed, Timing

__all__ = [
    "DEFAULT_TOKENS",
    "HINT",
    "MAX_TOKENS",
    "SpeedReport",
    "TargetSpeed",
    "Timing",
    "check_tokens",
    "measure",
    "parse_tokens",
    "resolve_device",
    "time_pair",
]
