"""Scoring a model on evaluation data: the sliding-window perplexity, mean-pooled
cosine and accuracy; :class:`EvalReference` (a model scored, for others to be compared
with), :func:`evaluate` and :func:`perplexity`."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.data import to_device
from tnsurgery.errors import UserInputError
from tnsurgery.evaluation.reading import (
    EvalData,
    check_comparable,
    default_window,
    max_positions,
    read_data,
    vocab_size,
)
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec.evaluation import Evaluation
from tnsurgery.tracing import call_model, eval_mode
from tnsurgery.training.losses import pooled

TOKENS_PER_FORWARD = 4096
"""Most tokens in one forward pass of the perplexity (its logits: tokens × vocabulary)."""


@dataclass
class EvalResult:
    """A metric of ``model`` on some data, beside ``baseline``'s on the same data.

    Attributes:
        metric: ``"perplexity"``, ``"cosine"`` or ``"accuracy"``.
        model: the model's value (cosine: its mean cosine to the baseline).
        baseline: the baseline's value on the same data (cosine: 1.0, the reference;
            ``None`` without a baseline).
        count: the tokens scored (perplexity) or the examples judged (cosine; accuracy:
            the labels counted).
        details: perplexity: ``window``, ``stride``; cosine: ``min``.
    """

    metric: str
    model: float
    baseline: float | None
    count: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """``"tokens"`` (perplexity) or ``"examples"``."""
        return "tokens" if self.metric == "perplexity" else "examples"

    def to_dict(self, names: tuple[str, str] = ("model", "baseline")) -> dict[str, Any]:
        """``{"metric", names[0]: value, names[1]: value, "tokens" | "examples": n, ...}``
        with ``ratio`` (perplexity) or ``difference`` (accuracy) of the two values."""
        out: dict[str, Any] = {"metric": self.metric, names[0]: self.model}
        out[names[1]] = self.baseline
        out[self.unit] = self.count
        if self.baseline is not None and self.metric == "perplexity":
            out["ratio"] = self.model / self.baseline
        if self.baseline is not None and self.metric == "accuracy":
            out["difference"] = self.model - self.baseline
        return {**out, **self.details}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _tensor(out: Any, keys: tuple[str, ...]) -> torch.Tensor:
    """The first of ``keys`` an output holds (attribute or key), else its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in keys:
        v = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise UserInputError(f"evaluation: the model returned no tensor ({type(out).__name__})")


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs``; a failure (data the model cannot take) as a user error."""
    try:
        return call_model(model, inputs)
    except UserInputError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise UserInputError(
            f"evaluation: {type(model).__name__} fails on the data (is it the input the model "
            f"takes?): {type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        ) from None


# ------------------------------------------------------------------- scoring


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of each window over a sequence of ``length`` tokens:
    tokens ``first..end-1`` are scored, each from the tokens before it from ``begin``.
    Every token but the first is scored exactly once (``stride < window``: each window
    holds the token before the first it scores)."""
    out, scored_to = [], 0
    for begin in range(0, max(length - 1, 0), stride):
        end = min(begin + window, length)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
        scored_to = end
        if end == length:
            break
    return out


def _window(model: nn.Module, window: int | None, stride: int | None) -> tuple[int, int]:
    window = window or default_window(model)
    most = max_positions(model)
    if most is not None and window > most:
        raise UserInputError(
            f"evaluation: window {window} is longer than the {most} positions the model takes"
        )
    if window < 2:
        raise UserInputError(f"evaluation: window {window}: a window holds at least 2 tokens")
    stride = stride or max(1, window // 2)
    if not 1 <= stride < window:
        raise UserInputError(
            f"evaluation: stride {stride} must be at least 1 and less than the window "
            f"({window}): the first token of each window would have no context"
        )
    return window, stride


def _lm_logits(model: nn.Module, ids: torch.Tensor, keyword: bool) -> torch.Tensor:
    ref = next(iter(model.parameters()), None)
    ids = ids.to(ref.device) if ref is not None else ids
    inputs: Any = {"input_ids": ids} if keyword else ids
    if keyword and _accepts(model, "use_cache"):  # (no key/value cache to build)
        inputs["use_cache"] = False
    logits = _tensor(_call(model, inputs), ("logits",))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise UserInputError(
            "evaluation: perplexity needs logits for every token (batch, tokens, vocabulary); "
            f"the model returned {tuple(logits.shape)} for {tuple(ids.shape)} token ids: is "
            "it a causal language model?"
        )
    return logits


def _nll(
    model: nn.Module, data: EvalData, window: int, stride: int, batch_size: int
) -> tuple[float, int]:
    """Summed negative log-likelihood of every scored token, and their number."""
    items = [(s, *w) for s in data.sequences for w in windows(len(s), window, stride)]
    items.sort(key=lambda it: it[2] - it[1])  # windows of one length share a forward pass
    most = vocab_size(model)
    top = max(int(s.max()) for s in data.sequences if len(s))
    if most is not None and top >= most:
        raise UserInputError(
            f"evaluation: token id {top} is beyond the model's vocabulary ({most:,} tokens): "
            "was the data tokenized for another model?"
        )
    per = max(1, min(batch_size, TOKENS_PER_FORWARD // window))
    total, count, i = 0.0, 0, 0
    while i < len(items):
        length = items[i][2] - items[i][1]
        group = [it for it in items[i : i + per] if it[2] - it[1] == length]
        i += len(group)
        ids = torch.stack([s[b:e] for s, b, e, _ in group])
        logits = _lm_logits(model, ids, data.keyword)
        targets = ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
        )  # (windows, length - 1): position j predicts token j + 1
        first = torch.tensor([f - b for _, b, _, f in group])
        scored = (torch.arange(1, length)[None, :] >= first[:, None]).to(nll.device)
        total += float(nll[scored].sum())
        count += int(scored.sum())
    return total, count


def _embeddings(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Per-example vectors: the last hidden state mean-pooled over real tokens."""
    out = _call(model, inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(inputs, dict) and hasattr(model, "config"):
        states = _call(model, {**inputs, "output_hidden_states": True}).hidden_states
        hidden = states[-1] if states else None
    if not isinstance(hidden, torch.Tensor):
        hidden = _tensor(out, ("logits",))
    return pooled(hidden, inputs).float().cpu()


def _correct(model: nn.Module, inputs: Any, labels: torch.Tensor) -> tuple[int, int]:
    logits = _tensor(_call(model, inputs), ("logits",))
    predicted = logits.argmax(-1).cpu()
    if labels.numel() != predicted.numel():
        raise UserInputError(
            f"evaluation: labels of shape {tuple(labels.shape)} do not fit the predictions "
            f"{tuple(predicted.shape)} (the argmax of the model's output)"
        )
    labels = labels.reshape(predicted.shape).cpu()
    counted = labels != -100
    return int((predicted[counted] == labels[counted]).sum()), int(counted.sum())


@dataclass
class _Score:
    value: float | None
    count: int
    vectors: list[torch.Tensor] | None = None


def _score(model: nn.Module, data: EvalData, window: int, stride: int, batch_size: int) -> _Score:
    with eval_mode(model):
        if data.metric == "perplexity":
            total, count = _nll(model, data, window, stride, batch_size)
            return _Score(math.exp(total / count), count)
        if data.metric == "cosine":
            vectors = [_embeddings(model, to_device(b, model)) for b in data.batches]
            return _Score(None, sum(len(v) for v in vectors), vectors)
        right = seen = 0
        for inputs, labels in zip(data.batches, data.labels, strict=True):
            r, n = _correct(model, to_device(inputs, model), labels)
            right, seen = right + r, seen + n
        if not seen:
            raise UserInputError("evaluation: no label to count (all -100)")
        return _Score(right / seen, seen)


@dataclass
class EvalReference:
    """A model scored on evaluation data read once: what other models are compared with
    (``apply`` scores the original before surgery, the surgered model after)."""

    data: EvalData
    score: _Score
    window: int  # (perplexity; 0 otherwise)
    stride: int
    batch_size: int

    def compare(self, model: nn.Module) -> EvalResult:
        """``model`` scored on the same data, beside the reference."""
        mine = _score(model, self.data, self.window, self.stride, self.batch_size)
        metric = self.data.metric
        if metric == "cosine":
            cos = torch.cat(
                [
                    F.cosine_similarity(a, b, dim=-1)
                    for a, b in zip(mine.vectors, self.score.vectors, strict=True)
                ]
            )
            return EvalResult(metric, float(cos.mean()), 1.0, len(cos), {"min": float(cos.min())})
        details = {"window": self.window, "stride": self.stride} if metric == "perplexity" else {}
        return EvalResult(metric, mine.value, self.score.value, mine.count, details)

    def record(self, model: nn.Module) -> dict[str, Any]:
        """What the manifest records: ``{"metric", "surgered", "original", "tokens" |
        "examples", ...}``, ``model`` being the surgered one."""
        return self.compare(model).to_dict(("surgered", "original"))


def reference_for(
    model: nn.Module,
    data: Any,
    *,
    metric: str = "auto",
    window: int | None = None,
    stride: int | None = None,
    samples: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    labels: str | int = "labels",
    seed: int = 0,
    registry: Registry | None = None,
) -> EvalReference:
    """Read ``data`` (see :func:`read_data`) with ``model``'s tokenizer and score
    ``model`` on it; :meth:`EvalReference.compare` then scores another model on the
    same data."""
    ev = read_data(
        model, data, metric=metric, samples=samples, max_tokens=max_tokens,
        batch_size=batch_size, labels=labels, seed=seed, registry=registry,
    )  # fmt: skip
    window, stride = _window(model, window, stride) if ev.metric == "perplexity" else (0, 0)
    score = _score(model, ev, window, stride, batch_size)
    return EvalReference(ev, score, window, stride, batch_size)


def spec_reference(
    model: nn.Module, options: Evaluation | None, registry: Registry | None = None
) -> EvalReference | None:
    """The spec's ``evaluation`` section on ``model`` (the original), before surgery;
    ``None`` without one. Record ``reference.record(surgered)`` after it."""
    if options is None:
        return None
    return reference_for(
        model, options.data, metric=options.metric, window=options.window,
        stride=options.stride, samples=options.samples, max_tokens=options.max_tokens,
        batch_size=options.batch_size, labels=options.labels, seed=options.seed,
        registry=registry,
    )  # fmt: skip


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    baseline: nn.Module | None = None,
    metric: str = "auto",
    window: int | None = None,
    stride: int | None = None,
    samples: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    labels: str | int = "labels",
    seed: int = 0,
    registry: Registry | None = None,
) -> EvalResult:
    """``model``'s perplexity, cosine to ``baseline`` or accuracy on ``data``, beside
    ``baseline``'s on the same tokens.

    Args:
        model: the model to evaluate (e.g. the surgered one).
        data: a spec ``data`` dict (``{"source": "text", "path": ...}``, read with
            ``model``'s tokenizer), or a tensor, tuple or dict of tensors.
        baseline: the model to compare with (e.g. the original); cosine needs it.
        metric: ``"auto"`` (perplexity for a causal LM, accuracy when the batches hold
            labels, cosine otherwise), ``"perplexity"``, ``"cosine"``, ``"accuracy"``.
        window: perplexity: tokens per forward pass; default :func:`default_window`.
        stride: perplexity: tokens the window moves by; default half the window.
        samples: read at most this many examples (lines, rows).
        max_tokens: perplexity: score at most this many tokens.
        batch_size: examples (perplexity: windows) per forward pass.
        labels: accuracy: the key (dict batches) or index (tuple batches) of labels.
        seed: the data source's seed.
        registry: the data sources (the installed plugins by default).

    Raises:
        UserInputError: unreadable or empty data, cosine without a baseline, models
            with different vocabularies or tokenizers, a window the model cannot take.
    """
    registry = registry or get_registry()
    if baseline is not None:
        check_comparable(model, baseline, registry)
    ev = read_data(
        model, data, metric=metric, samples=samples, max_tokens=max_tokens,
        batch_size=batch_size, labels=labels, seed=seed, registry=registry,
    )  # fmt: skip
    if ev.metric == "cosine" and baseline is None:
        raise UserInputError(
            "evaluation: cosine compares the model with a baseline (the original): give one "
            "(--baseline ORIGINAL), or choose another metric"
        )
    w, s = (0, 0)
    if ev.metric == "perplexity":
        w, s = _window(model, window, stride)
        if baseline is not None:
            _window(baseline, w, s)
    if baseline is None:
        mine = _score(model, ev, w, s, batch_size)
        details = {"window": w, "stride": s} if ev.metric == "perplexity" else {}
        return EvalResult(ev.metric, mine.value, None, mine.count, details)
    reference = EvalReference(ev, _score(baseline, ev, w, s, batch_size), w, s, batch_size)
    return reference.compare(model)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> EvalResult:
    """The perplexity of ``model`` on ``input_ids`` (``(rows, tokens)``, each row a
    sequence, used as given: no BOS added; positions whose ``attention_mask`` is 0 or
    whose id is the config's ``pad_token_id`` are dropped), with a sliding window (see
    :func:`windows`). A Hugging Face model is called with ``input_ids=``, any other
    with the ids as its one argument; it returns logits ``(rows, tokens, vocabulary)``.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    batch = {"input_ids": ids}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask.reshape(ids.shape)
    ev = read_data(model, batch, metric="perplexity", batch_size=max(len(ids), 1))
    w, s = _window(model, window, stride)
    mine = _score(model, ev, w, s, batch_size)
    return EvalResult("perplexity", mine.value, None, mine.count, {"window": w, "stride": s})
