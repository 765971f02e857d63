"""The spec's ``training`` section: every option of post-surgery training.

Part of the spec (the public contract): plain pydantic models that import
nothing of the training loop, so validating a spec never imports it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tnsurgery.matching import pattern_problem


class DistillOptions(BaseModel):
    """How the student is matched to the teacher (``mode: distill``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(4.0, gt=0, description="Softmax temperature of logit KL.")
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of distillation vs the task loss when batches carry labels.",
    )
    features: Literal["surgered", "none"] = Field(
        "none",
        description="'surgered': also match each surgered module's output to the teacher's "
        "module it replaced; 'none' (the default: as good in short runs, and faster; "
        "benchmarks/bench_defaults.py): the model outputs only.",
    )
    output: Literal["auto", "kl", "mse", "cosine", "none"] = Field(
        "auto",
        description="Loss on the model outputs: 'kl' (logits at the temperature), 'mse' "
        "(normalized), 'cosine' (1 - cosine of per-example vectors, sequence outputs "
        "mean-pooled over real tokens: sentence embeddings), 'auto': kl for a 2-D output "
        "tensor, mse otherwise.",
    )
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature loss.")
    match: list[str] = Field(
        default_factory=list,
        description="Also match the outputs of these modules (spec patterns, e.g. "
        "'encoder.layer.*': every transformer block's hidden state) to the teacher's.",
    )

    @field_validator("match")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        bad = [msg for p in patterns if (msg := pattern_problem(p))]
        if bad:
            raise ValueError("; ".join(bad))
        return patterns


class CheckpointOptions(BaseModel):
    """Where and how often to save a resumable state."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    every: int = Field(100, ge=1, description="Save every this many steps (and at the end).")
    dir: str = Field("checkpoints", description="Directory of the checkpoints.")


class TTOptions(BaseModel):
    """Hygiene of TT layers during training (the TT literature's stabilizers)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    clip_core_norm: float | None = Field(
        None, gt=0, description="After each step, scale down any core whose norm exceeds this."
    )
    normalize_cores: bool = Field(
        False,
        description="After each step, give every core the same norm (the weight unchanged).",
    )
    reorthogonalize_every: int | None = Field(
        None, ge=1, description="Put the cores in left-canonical form every this many steps."
    )
    log_stats_every: int | None = Field(
        None, ge=1, description="Add tt_stats() of every TT layer to the metrics this often."
    )


class ProgressiveRank(BaseModel):
    """Progressive rank: the surgered layers start at the ranks the spec built and are
    cut to ``final`` of them over ``stages`` equal stages (geometric steps)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    final: float = Field(..., gt=0, lt=1, description="Final ranks, as a fraction of the start.")
    stages: int = Field(3, ge=2, description="Stages (the first trains at the start ranks).")


class Training(BaseModel):
    """The spec's ``training`` section (every option has a default but ``data``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["distill", "finetune"] = Field("distill", description="distill or finetune.")
    data: dict[str, Any] = Field(..., description="Training batches (same sources as calibration).")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(
        3e-4,
        gt=0,
        description="Peak learning rate (the default recovers best in short runs: "
        "benchmarks/bench_defaults.py).",
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    scheduler: Literal["cosine", "step", "plateau", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warmup from 0 to lr, in steps (default: a tenth of 'steps').",
    )
    step_size: int = Field(100, ge=1, description="'step' schedule: decay every this many steps.")
    gamma: float = Field(0.5, gt=0, le=1, description="'step'/'plateau': decay factor.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (null: none).")
    seed: int = Field(0, description="Seed of the run (initial RNG state, data order).")
    trainable: Literal["surgered", "all"] | None = Field(
        None,
        description="'all': every parameter trains; 'surgered': only the layers surgery "
        "made (the rest frozen). Default: 'all' (it recovers best: "
        "benchmarks/bench_defaults.py), 'surgered' with 'unfreeze_stages'.",
    )
    loss: Literal["cross_entropy", "mse"] = Field(
        "cross_entropy", description="Task loss when batches carry labels."
    )
    labels: str | int | None = Field(
        None,
        description="Where a batch holds its labels: a key of a dict batch, or the index of "
        "a tuple batch (e.g. -1); null: no labels (distillation only).",
    )
    distill: DistillOptions = Field(default_factory=DistillOptions)
    freeze_observers_at: int | None = Field(
        None, ge=0, description="QAT: step at which observers stop updating (scales frozen)."
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every this many steps.")
    eval_data: dict[str, Any] | None = Field(
        None, description="Evaluation batches (default: none; then the metric is skipped)."
    )
    metric: Literal["cosine", "accuracy"] = Field(
        "cosine",
        description="'cosine': mean cosine of outputs to the teacher's; 'accuracy': of the "
        "argmax against labels.",
    )
    keep_best: bool = Field(True, description="End with the best evaluated state.")
    dropout: bool = Field(
        False,
        description="Train with the model in training mode (dropout on, batch-norm "
        "statistics updating). Off by default: the student then computes exactly what the "
        "teacher's layers are matched against (QAT observers still update).",
    )
    checkpoint: CheckpointOptions | None = Field(None, description="Resumable checkpoints.")
    log: str | None = Field(None, description="Write metrics as JSON lines to this file.")
    unfreeze_stages: int | None = Field(
        None,
        ge=1,
        description="Progressive unfreezing: split the steps into this many stages; stage k "
        "trains the last k/N of the surgered layers (in call order), last layers first.",
    )
    tt: TTOptions = Field(default_factory=TTOptions, description="TT layer hygiene.")
    progressive_rank: ProgressiveRank | None = Field(
        None,
        description="Start at the ranks surgery built and truncate (LowRankLinear) or "
        "TT-round (TTLinear) them down in stages to a final fraction, training at each stage.",
    )
    order: Literal["compress_then_distill", "distill_then_compress"] = Field(
        "compress_then_distill",
        description="With surgery.apply / tnsurgery apply: 'compress_then_distill' trains the "
        "surgered model, starting from the factors surgery built; 'distill_then_compress' "
        "trains the dense model first (every parameter; distilled from a teacher given to "
        "apply, or fine-tuned on labels), then compresses the trained model (calibration "
        "runs on it). Compressing while distilling is 'progressive_rank'.",
    )
    trainer: str = Field(
        "builtin",
        description="Which trainer runs this section: 'builtin', or one a plugin registers "
        "(register_trainers), e.g. a Lightning or Accelerate loop.",
    )
    amp: bool = Field(
        False,
        description="Mixed precision: forward passes under autocast (bfloat16 on CPU and on "
        "GPUs that support it, else float16 with loss scaling); the weights and the "
        "optimizer stay in float32.",
    )
    tensorboard: str | None = Field(
        None, description="Also write the metrics as TensorBoard scalars to this directory."
    )
    distributed: Literal["none", "fsdp"] = Field(
        "none",
        description="'fsdp': under torchrun (torchrun --nproc_per_node N -m tnsurgery "
        "train ...), shard the model, the teacher and the optimizer state over the "
        "processes (FSDP), each process taking a slice of every batch: the same steps and "
        "global batch as one process, for models that do not fit one device; launched "
        "without torchrun, one process trains as 'none' does. 'none': one process, or "
        "under torchrun a full copy per process (DDP), each taking its own batches.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Training:
        if self.warmup_steps is None:  # the defaults that depend on other options
            self.warmup_steps = self.steps // 10
        if self.trainable is None:
            self.trainable = "surgered" if self.unfreeze_stages else "all"
        problems = []
        if self.mode == "finetune" and self.labels is None:
            problems.append("mode 'finetune' needs 'labels' (where batches hold them)")
        if self.metric == "accuracy" and self.eval_every and self.labels is None:
            problems.append("metric 'accuracy' needs 'labels'")
        if self.eval_every and self.eval_data is None:
            problems.append("'eval_every' needs 'eval_data'")
        if self.scheduler == "plateau" and not self.eval_every:
            problems.append("scheduler 'plateau' follows evaluations: set 'eval_every'")
        if self.unfreeze_stages and self.trainable == "all":
            problems.append("'unfreeze_stages' unfreezes surgered layers: use trainable 'surgered'")
        if self.order == "distill_then_compress":
            for name in ("unfreeze_stages", "progressive_rank"):
                if getattr(self, name) is not None:
                    problems.append(
                        f"'{name}' acts on surgered layers: it needs order 'compress_then_distill'"
                    )
        if self.distributed == "fsdp":
            if self.progressive_rank is not None:
                problems.append("'progressive_rank' changes layer shapes: not with 'fsdp'")
            if self.tt != TTOptions():
                problems.append("'tt' tends whole TT cores: not with 'fsdp' (sharded cores)")
        if problems:
            raise ValueError("; ".join(problems))
        return self
