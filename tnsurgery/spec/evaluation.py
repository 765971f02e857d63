"""The spec's ``evaluation`` section: the metric ``apply`` measures on the surgered model
and on the original, side by side, after surgery (and after training).

Part of the spec (the public contract): a plain pydantic model that imports nothing
of the evaluation itself (:mod:`tnsurgery.evaluation`, whose docstrings say how each
metric is computed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Metric = Literal["auto", "perplexity", "cosine", "accuracy"]


class Evaluation(BaseModel):
    """What ``apply`` evaluates the surgered model and the original on, and how: the
    manifest then records ``evaluation: {"metric", "surgered", "original", "tokens" |
    "examples", ...}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: dict[str, Any] = Field(
        ...,
        description="The evaluation data, in the form of calibration.data: {'source': "
        "'text'|'tensors'|'sentences'|..., ...its params}. Text sources are read as one "
        "token stream (their lines in order); the rows of other sources as given.",
    )
    metric: Metric = Field(
        "auto",
        description="'perplexity' (causal LMs: sliding window, each token scored once), "
        "'cosine' (mean-pooled last hidden state, per example, to the original's), "
        "'accuracy' (argmax against labels). 'auto': perplexity for a causal LM, accuracy "
        "when the batches hold labels, cosine otherwise.",
    )
    samples: int | None = Field(
        None, ge=1, description="Read at most this many examples (lines, rows); default: all."
    )
    max_tokens: int | None = Field(
        None, ge=2, description="Perplexity: score at most this many tokens; default: all."
    )
    window: int | None = Field(
        None,
        ge=2,
        description="Perplexity: tokens per forward pass (context + scored); default: the "
        "model's maximum positions, at most 1024.",
    )
    stride: int | None = Field(
        None,
        ge=1,
        description="Perplexity: tokens the window moves by, less than the window (each "
        "window after the first scores this many new tokens); default: half the window.",
    )
    batch_size: int = Field(8, ge=1, description="Examples (or windows) per forward pass.")
    labels: str | int = Field(
        "labels",
        description="Where batches hold labels (accuracy): a key of dict batches, or the "
        "index of tuple batches (e.g. -1).",
    )
    seed: int = Field(0, description="Seed of the data source (random data, shuffling).")

    @model_validator(mode="after")
    def _stride_within_window(self) -> Evaluation:
        if self.window is not None and self.stride is not None and self.stride >= self.window:
            raise ValueError(
                f"stride {self.stride} is not less than window {self.window}: the first token "
                "of each window would have no context (give a stride below the window)"
            )
        return self
