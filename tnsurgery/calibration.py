"""Calibration: the second moment of each target's inputs on real data, streamed.

Surgery with a spec-level ``"calibration"`` runs the original model once over
the data and accumulates, for each target layer, ``G = Σ x xᵀ`` over every
input row it sees (a Linear's input vectors; a Conv2d's input patches, as
``F.unfold`` lays them out against the kernel matrix ``(out, in·kh·kw)``).
Padding is left out: when a batch carries an ``attention_mask`` ``(batch, tokens)``
(Hugging Face text batches), a sequence layer's rows at masked positions are
dropped, since the model's output never depends on them. Nothing else is
kept: no activation outlives its forward hook. A transform then minimizes
``‖(W − Ŵ) X‖`` on that data instead of ``‖W − Ŵ‖`` (see ``factorize``'s
whitening), because ``‖(W − Ŵ) X‖² = tr((W − Ŵ) G (W − Ŵ)ᵀ)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.tracing import call_model, eval_mode


@dataclass
class InputStats:
    """``gram = Σ x xᵀ`` (float64, on the CPU) over ``rows`` input rows of one layer."""

    gram: torch.Tensor
    rows: int

    def second_moment(self, damping: float = 0.0) -> torch.Tensor:
        """``G / rows + damping · mean(diag) · I``: the (damped) input second moment."""
        c = self.gram / max(self.rows, 1)
        if damping:
            mean_diag = float(torch.diagonal(c).mean())
            c = c + torch.eye(c.shape[0], dtype=c.dtype) * (damping * max(mean_diag, 1e-30))
        return c


@dataclass
class CalibrationResult:
    """Per-layer input statistics, and what was run to get them."""

    stats: dict[str, InputStats]
    examples: int
    batches: int
    seconds: float
    first_batch: Any = None

    def describe(self) -> dict[str, Any]:
        """JSON-compatible summary for the plan and the manifest."""
        return {
            "examples": self.examples,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "layers": len(self.stats),
        }


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The rows ``module`` multiplies by its weight matrix, or ``None`` when the layer
    is not one whose input statistics apply (grouped or non-zero-padded convs)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )  # (N, C·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return None


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The ``(batch, tokens)`` boolean mask of real (non-padding) positions of a
    dict batch with an ``attention_mask``, or ``None`` (nothing is padding)."""
    if not isinstance(batch, dict):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.bool()


def unpadded(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` without its padded positions (``t[mask]``, tokens flattened) when its
    leading dims are the mask's ``(batch, tokens)``; ``t`` unchanged otherwise."""
    if mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return t
    return t[mask.to(t.device)]


def supports(module: nn.Module) -> bool:
    """Whether :func:`collect` can gather statistics for ``module``."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def collect(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[Any],
    progress: Callable[[int, int, str], None] | None = None,
    total: int | None = None,
) -> CalibrationResult:
    """Run ``model`` (eval, no grad) over ``batches`` and accumulate each named
    module's input second moment. The model is left as it was."""
    modules = dict(model.named_modules())
    wanted = [n for n in dict.fromkeys(names) if n in modules and supports(modules[n])]
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in wanted}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str):
        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            if isinstance(mod, nn.Linear):
                x = unpadded(x, current["mask"])
            r = input_rows(mod, x)
            if r is None:
                return
            if r.shape[0] == 0:
                return
            # one batch's product in float32 (fast; its rounding is far below the
            # damping), accumulated over batches in float64
            r = r.double() if r.dtype == torch.float64 else r.float()
            g = (r.mT @ r).double()
            grams[name] = g.cpu() if name not in grams else grams[name] + g.cpu()
            rows[name] += r.shape[0]

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in wanted]
    from tnsurgery.data import examples_in

    t0 = time.perf_counter()
    examples = count = 0
    first = None
    try:
        with eval_mode(model):
            for batch in batches:
                if first is None:
                    first = batch
                current["mask"] = padding_mask(batch)
                call_model(model, _to_device(batch, model))
                examples += examples_in(batch)
                count += 1
                if progress:
                    progress(examples, total or examples, "calibrating")
    finally:
        for h in handles:
            h.remove()
    stats = {n: InputStats(grams[n], rows[n]) for n in wanted if n in grams}
    return CalibrationResult(stats, examples, count, time.perf_counter() - t0, first)


def _to_device(batch: Any, model: nn.Module) -> Any:
    ref = next(iter(model.parameters()), None)
    if ref is None:
        return batch

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return t.to(device=ref.device, dtype=ref.dtype)
        return t.to(device=ref.device)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch)
    return move(batch)
