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

from tnsurgery.compare import weight_error
from tnsurgery.data import batches, examples_in, to_device
from tnsurgery.decompositions.conv1d import is_conv1d
from tnsurgery.errors import SurgeryError, UserInputError
from tnsurgery.hooks import hooked
from tnsurgery.plan import TargetPlan
from tnsurgery.plugins import Registry
from tnsurgery.spec import Spec
from tnsurgery.stats import CrossStats, InputStats
from tnsurgery.targets import RuleTargets
from tnsurgery.tracing import call_model, eval_mode
from tnsurgery.transform import Context, Transform


@dataclass
class CalibrationResult:
    """Per-layer input statistics, and what was run to get them."""

    stats: dict[str, InputStats]
    examples: int
    batches: int
    seconds: float
    first_batch: Any = None
    batches_seen: list[Any] | None = None  # kept for sequential calibration only

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
    if is_conv1d(module):  # GPT-2's Conv1D: x @ weight, weight (in, out)
        return x.reshape(-1, module.weight.shape[0])
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


def product_rows(module: nn.Module, args: tuple, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of a forward pre-hook's ``args`` as ``module`` (a Linear or Conv2d)
    multiplies them, padded positions dropped, ready for a Gram product: float32 (one
    batch's product is fast and its rounding far below the damping; sums over
    batches are kept in float64) or float64 as given. ``None`` when none apply."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0].detach()
    if isinstance(module, nn.Linear) or is_conv1d(module):
        x = unpadded(x, mask)
    r = input_rows(module, x)
    if r is None:
        return None
    return r.double() if r.dtype == torch.float64 else r.float()


def supports(module: nn.Module) -> bool:
    """Whether :func:`collect` can gather statistics for ``module``."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
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
    keep_batches: bool = False,
) -> CalibrationResult:
    """Run ``model`` (eval, no grad) over ``batches`` and accumulate each named
    module's input second moment. The model is left as it was. ``keep_batches``:
    also return the batches (``batches_seen``), for a later pass."""
    modules = dict(model.named_modules())
    wanted = [n for n in dict.fromkeys(names) if n in modules and supports(modules[n])]
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in wanted}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str):
        def hook(mod, args):
            r = product_rows(mod, args, current["mask"])
            if r is None or r.shape[0] == 0:
                return
            g = (r.mT @ r).double()
            grams[name] = g.cpu() if name not in grams else grams[name] + g.cpu()
            rows[name] += r.shape[0]

        return hook

    t0 = time.perf_counter()
    examples = count = 0
    first = None
    kept: list[Any] = []
    with hooked([(n, modules[n]) for n in wanted], make_hook, pre=True):
        with eval_mode(model):
            for batch in batches:
                if first is None:
                    first = batch
                if keep_batches:
                    kept.append(batch)
                current["mask"] = padding_mask(batch)
                call_model(model, to_device(batch, model))
                examples += examples_in(batch)
                count += 1
                if progress:
                    progress(examples, total or examples, "calibrating")
    if count == 0:
        raise UserInputError("calibration: the data gave no batch")
    stats = {n: InputStats(grams[n], rows[n]) for n in wanted if n in grams}
    seconds = time.perf_counter() - t0
    return CalibrationResult(stats, examples, count, seconds, first, kept if keep_batches else None)


# ------------------------------------------------------- sequential refit
#
# Layer by layer, the factors above keep each layer's output on the inputs the
# *original* model gives it. Once earlier layers are surgered, a layer receives
# other inputs; sequential calibration re-solves each replacement, in call order,
# for the inputs it now gets: ``min ‖X_o Wᵀ − X_c Ŵᵀ‖`` with ``X_o`` the original
# layer's inputs and ``X_c`` the surgered model's, so later layers compensate the
# errors of earlier ones (as GPTQ and SVD-LLM v2 do).


class _Stop(BaseException):  # not an Exception: model code catching those lets it through
    """Raised by a hook once every layer of the group has seen its input."""


def call_groups(model: nn.Module, names: list[str], batch: Any) -> list[list[str]]:
    """``names`` in the order ``model`` calls them on ``batch``, grouped: layers that
    receive the very same input tensor (e.g. a block's query, key and value) form one
    group, refitted together. Layers never called are left out."""
    modules = dict(model.named_modules())
    seen: list[tuple[str, torch.Tensor]] = []  # the inputs themselves, kept alive: an
    # id() of a freed tensor can come back for the next one

    def make(name):
        def hook(mod, args):
            if args and isinstance(args[0], torch.Tensor) and name not in dict(seen):
                seen.append((name, args[0]))

        return hook

    with hooked([(n, modules[n]) for n in names if n in modules], make, pre=True):
        with eval_mode(model):
            call_model(model, to_device(batch, model))
    groups: list[list[str]] = []
    last = None
    for name, tensor in seen:
        if groups and tensor is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = tensor
    return groups


def cross_stats(
    original: nn.Module,
    surgered: nn.Module,
    group: list[str],
    batches: list[Any],
    grams_original: dict[str, InputStats] | None = None,
) -> dict[str, CrossStats]:
    """Run both models over ``batches`` (each stopped once the group has its inputs)
    and accumulate :class:`CrossStats` for every layer of ``group``.
    ``grams_original``: the calibration's statistics of the original inputs over the
    same batches, whose ``X_oᵀX_o`` is reused instead of computed again; where its
    row count is not this pass's, ``gram_original`` is ``None``."""
    known = grams_original or {}
    current: dict[str, Any] = {"mask": None, "inputs": {}, "done": set()}
    sums: dict[str, list[torch.Tensor]] = {}
    rows: dict[str, int] = {}

    mods_o, mods_s = dict(original.named_modules()), dict(surgered.named_modules())

    def rows_of(name, args) -> torch.Tensor | None:
        # as the original layer multiplies them (the replacement takes the same)
        return product_rows(mods_o[name], args, current["mask"])

    def hook_original(name):
        def hook(mod, args):
            r = rows_of(name, args)
            if r is not None:
                current["inputs"][name] = r
            if len(current["inputs"]) == len(group):
                raise _Stop

        return hook

    def hook_surgered(name):
        def hook(mod, args):
            xc, xo = rows_of(name, args), current["inputs"].get(name)
            if xc is not None and xo is not None and xc.shape == xo.shape:
                parts = [(xc.mT @ xc).double(), (xc.mT @ xo).double()]
                if name not in known:
                    parts.append((xo.mT @ xo).double())
                if name in sums:
                    parts = [a + b for a, b in zip(sums[name], parts, strict=True)]
                sums[name] = parts
                rows[name] = rows.get(name, 0) + xc.shape[0]
            current["done"].add(name)
            if len(current["done"]) == len(group):
                raise _Stop

        return hook

    on_original = hooked([(n, mods_o[n]) for n in group], hook_original, pre=True)
    on_surgered = hooked([(n, mods_s[n]) for n in group], hook_surgered, pre=True)
    with on_original, on_surgered, eval_mode(original, surgered):
        for batch in batches:
            current.update(mask=padding_mask(batch), inputs={}, done=set())
            for model in (original, surgered):
                try:
                    call_model(model, to_device(batch, model))
                except _Stop:
                    pass
    out = {}
    for n, v in sums.items():
        if n not in known:
            go = v[2].cpu()
        else:
            go = known[n].gram if known[n].rows == rows[n] else None
        out[n] = CrossStats(v[0].cpu(), v[1].cpu(), go, rows[n])
    return out


def refit_sequentially(
    original: nn.Module,
    surgered: nn.Module,
    names: list[str],
    batches: list[Any],
    refit: Callable[[str, CrossStats], None],
    progress: Callable[[int, int, str], None] | None = None,
    grams_original: dict[str, InputStats] | None = None,
) -> int:
    """Call ``refit(name, stats)`` for every surgered layer in ``names``, group by
    group in call order, each group's :class:`CrossStats` gathered after the groups
    before it were refitted (``refit`` modifies the layer in ``surgered``). Returns
    the number of groups (passes over ``batches``)."""
    if not batches:
        return 0
    groups = call_groups(surgered, names, batches[0])
    for k, group in enumerate(groups):
        if progress:
            progress(k, len(groups), f"sequential calibration {group[0]}")
        stats = cross_stats(original, surgered, group, batches, grams_original)
        if any(st.gram_original is None for st in stats.values()):  # rows differ: recount
            stats = cross_stats(original, surgered, group, batches)
        for name in group:
            if name in stats:
                refit(name, stats[name])
    return len(groups)


def refit_rule(
    original: nn.Module,
    work: nn.Module,
    transform: Transform,
    index: int,
    todo: list[TargetPlan],
    calib: CalibrationResult,
    damping: float,
    progress: Callable[[int, int, str], None] | None,
    report: dict[str, Any],
) -> None:
    """Sequential calibration of one rule's replacements, right after the rule is
    built (so a later rule, e.g. ``qat``, wraps the refitted layers): each layer its
    transform can refit is re-solved in call order on the inputs the surgered model
    now gives it. Records ``resolved["sequential_output_error"]`` (the layer's output
    error on the data) and ``resolved["sequential"]`` (``refitted`` or ``kept``: the
    refit did no better), updates the target's weight error, and counts in ``report``
    (``groups``, ``refitted``, ``not_refittable``, ``seconds``)."""
    t0 = time.perf_counter()
    originals = dict(original.named_modules())
    current = dict(work.named_modules())
    able = [
        tp
        for tp in todo
        if transform.refit is not None
        and tp.name in originals
        and (not transform.refits or isinstance(current[tp.name], transform.refits))
    ]
    report["not_refittable"] += len(todo) - len(able)
    if not able:
        return
    by_name = {tp.name: tp for tp in able}

    def refit(name: str, stats: CrossStats) -> None:
        tp, new, old = by_name[name], current[name], originals[name]
        before = [p._version for p in new.parameters()]
        ctx = Context(name=name, input_shape=tp.input_shape, damping=damping)
        err = transform.refit(new, old, stats, ctx)
        if err is None:
            return
        changed = [p._version for p in new.parameters()] != before
        tp.resolved = {
            **(tp.resolved or {}),
            "sequential_output_error": err,
            "sequential": "refitted" if changed else "kept",
        }
        if changed:
            report["refitted"] += 1
            tp.weight_error = weight_error(old, new)

    try:  # the calibration's X_oᵀX_o is reused: same batches and rows
        report["groups"] += refit_sequentially(
            original, work, list(by_name), calib.batches_seen or [], refit, progress, calib.stats
        )
    except UserInputError:
        raise
    except Exception as exc:
        raise SurgeryError(
            f"sequential calibration of rule {index} ({transform.name}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    report["seconds"] = round(report["seconds"] + time.perf_counter() - t0, 3)


def calibrate(
    model: nn.Module,
    spec: Spec,
    targets: list[RuleTargets],
    registry: Registry,
    progress: Callable[[int, int, str], None] | None = None,
    keep_batches: bool = False,
) -> CalibrationResult | None:
    """The spec's calibration: input statistics of every module a rule selects on the
    original ``model`` (and, with ``keep_batches``, the batches, for the sequential
    refit); ``None`` when the spec has no calibration."""
    if spec.calibration is None:
        return None
    cal = spec.calibration
    names = [n for t in targets for n in t.names]
    try:
        data = batches(cal.data, model, cal.batch_size, cal.samples, cal.seed, registry=registry)
        return collect(model, names, data, progress, total=cal.samples, keep_batches=keep_batches)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"calibration: running the model on the data failed: {type(exc).__name__}: {exc}"
        ) from exc
