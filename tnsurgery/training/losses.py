"""What a student is trained on: distillation and task losses.

- :func:`normalized_mse`: ``‖s − t‖² / ‖t‖²``, for features and hidden states;
- :func:`kd_kl`: KL divergence of logits at a temperature (×T²);
- :class:`FeatureCapture`: forward hooks keeping the outputs of named modules
  (the surgered ones, and ``distill.match``), for feature distillation;
- :func:`training_loss`: the loss of one batch as the ``training`` options say,
  padded tokens never compared;
- :func:`pooled`: per-example vectors (sequence outputs mean-pooled over real
  tokens), for the ``cosine`` output loss and metric.

Each loss is a sum over the batch divided by a statistic of the batch (a count of
examples or tokens, a norm of the teacher's output). When several processes each
hold a slice of the batch (FSDP), ``batch_sum`` sums such a statistic over the
processes: each computes its share of the whole batch's loss, and the shares add
up to it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnsurgery.calibration import padding_mask, unpadded
from tnsurgery.errors import UserInputError
from tnsurgery.spec import Training
from tnsurgery.tracing import call_model


def main_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, ``last_hidden_state`` /
    ``logits`` of a Hugging Face output, or its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is None and isinstance(out, dict):
            v = out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise UserInputError(f"training: the model returned no tensor ({type(out).__name__})")


BatchSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a statistic of this process's slice of a batch over the whole batch."""


def normalized_mse(
    student: torch.Tensor, teacher: torch.Tensor, batch_sum: BatchSum | None = None
) -> torch.Tensor:
    """``‖s − t‖² / ‖t‖²`` (per batch): scale-free, so layers weigh alike."""
    s, t = student.float(), teacher.float()
    norm = t.square().sum()
    if batch_sum is not None:
        norm = batch_sum(norm)
    return (s - t).square().sum() / norm.clamp_min(1e-12)


def kd_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    batch_sum: BatchSum | None = None,
) -> torch.Tensor:
    """KL(teacher ‖ student) of softmaxes at ``temperature``, times ``temperature²``
    (the mean over the rows: examples, or real tokens)."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=-1)
    q = F.softmax(teacher.float() / t, dim=-1)
    if batch_sum is None:
        return F.kl_div(log_p, q, reduction="batchmean") * t * t
    return F.kl_div(log_p, q, reduction="sum") / _rows(log_p, batch_sum) * t * t


def _rows(t: torch.Tensor, batch_sum: BatchSum) -> torch.Tensor:
    """The number of rows (dim 0) of ``t`` and its like in the whole batch."""
    return batch_sum(torch.tensor(float(t.shape[0]), device=t.device))


class FeatureCapture:
    """Forward hooks storing the outputs of named modules (for feature distillation)."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = []
        for name in names:
            if name not in modules:
                continue

            def hook(mod, args, out, name=name):
                if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                    out = out[0]  # e.g. a transformer block's (hidden_states, ...)
                if isinstance(out, torch.Tensor):
                    self.outputs[name] = out.detach() if detach else out

            self.handles.append(modules[name].register_forward_hook(hook))

    def clear(self) -> None:
        """Forget the outputs of the last forward pass."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


def training_loss(
    opts: Training,
    model: nn.Module,
    teacher: nn.Module | None,
    inputs: Any,
    labels: torch.Tensor | None,
    s_cap: FeatureCapture | None,
    t_cap: FeatureCapture | None,
    batch_sum: BatchSum | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its parts (for the log), as ``opts`` says:
    ``distill``: the output loss (KL, normalized MSE or cosine) plus the feature loss
    of the modules ``s_cap``/``t_cap`` watch, mixed with the task loss by ``alpha``
    when ``labels`` exist; ``finetune``: the task loss. Padded tokens never count.
    With ``batch_sum``, this process's share of the loss of a batch several share."""
    parts: dict[str, float] = {}
    if s_cap:
        s_cap.clear()
    if t_cap:
        t_cap.clear()
    out = main_tensor(call_model(model, inputs))
    total = out.new_zeros((), dtype=torch.float32)
    mask = padding_mask(inputs)  # padded tokens are never compared
    if opts.mode == "distill":
        with torch.no_grad():
            t_out = main_tensor(call_model(teacher, inputs))
        d = opts.distill
        kind = d.output
        if kind == "auto":
            kind = "kl" if out.dim() == 2 else "mse"
        distill = out.new_zeros((), dtype=torch.float32)
        if kind == "kl":
            s, t = unpadded(out, mask), unpadded(t_out, mask)
            distill = distill + kd_kl(s, t, d.temperature, batch_sum)
        elif kind == "mse":
            s, t = unpadded(out, mask), unpadded(t_out, mask)
            distill = distill + normalized_mse(s, t, batch_sum)
        elif kind == "cosine":
            a, b = pooled(out.float(), inputs), pooled(t_out.float(), inputs)
            gaps = 1 - F.cosine_similarity(a, b, dim=-1)
            distill = distill + (
                gaps.mean() if batch_sum is None else gaps.sum() / _rows(a, batch_sum)
            )
        if s_cap and t_cap and s_cap.outputs:
            feats = [
                normalized_mse(
                    unpadded(s_cap.outputs[n], mask), unpadded(t_cap.outputs[n], mask), batch_sum
                )
                for n in s_cap.outputs
                if n in t_cap.outputs
            ]
            if feats:
                feat = torch.stack(feats).mean()
                parts["feature_loss"] = float(feat.detach())
                distill = distill + d.feature_weight * feat
        parts["distill_loss"] = float(distill.detach())
        if labels is not None:
            task = task_loss(opts, out, labels, batch_sum)
            parts["task_loss"] = float(task.detach())
            total = d.alpha * distill + (1 - d.alpha) * task
        else:
            total = distill
    else:
        if labels is None:
            raise UserInputError("training: mode 'finetune' needs labels (set 'labels')")
        total = task_loss(opts, out, labels, batch_sum)
    return total, parts


def task_loss(
    opts: Training, out: torch.Tensor, labels: torch.Tensor, batch_sum: BatchSum | None = None
) -> torch.Tensor:
    """Cross-entropy (class indices) or MSE of ``out`` against ``labels`` (the mean
    over the labels, or over the output's elements)."""
    labels = labels.to(out.device)
    reduction = "mean" if batch_sum is None else "sum"
    if opts.loss == "mse":
        flat = out.reshape(-1)
        loss = F.mse_loss(out.float(), labels.float().reshape(out.shape), reduction=reduction)
    else:
        flat = labels.reshape(-1)
        logits = out.float().reshape(-1, out.shape[-1])
        loss = F.cross_entropy(logits, flat.long(), reduction=reduction)
    return loss if batch_sum is None else loss / _rows(flat, batch_sum)


def pooled(t: torch.Tensor, inputs: Any) -> torch.Tensor:
    """Per-example vectors: mean over tokens (masked) for sequence outputs."""
    if t.dim() <= 2:
        return t.reshape(t.shape[0], -1)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is not None and mask.shape == t.shape[:2]:
        m = mask.unsqueeze(-1).to(t.dtype)
        return (t * m).sum(1) / m.sum(1).clamp_min(1)
    return t.reshape(t.shape[0], t.shape[1], -1).mean(1)
