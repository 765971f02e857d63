"""The plan: what surgery will do (or did) to each target, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TargetPlan:
    """One target module of one rule pass.

    ``status`` is ``"replace"`` (the transform builds a replacement),
    ``"skip"`` (the transform declined, e.g. the layer would not shrink) or
    ``"refuse"`` (the pipeline will not touch it: tied weights, called more
    than once, not called by forward...). ``reason`` says why for the last two.
    Errors are relative Frobenius norms: ``predicted_error`` on the weight as
    the transform predicts it, ``weight_error`` measured on the built layer,
    ``output_error`` of the layer's output on the sample input;
    ``predicted_output_error`` on the calibration data (when the spec has
    some and the transform uses it).
    ``bytes_before``/``bytes_after``: storage of the module's tensors, and of
    its replacement as saved (integer weights once exported, for ``qat``).
    """

    rule_index: int
    rule: str
    name: str
    module_type: str
    transform: str
    status: str = "replace"
    reason: str | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    predicted_error: float | None = None
    predicted_output_error: float | None = None
    weight_error: float | None = None
    output_error: float | None = None
    call_order: int | None = None
    calls: int | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None


@dataclass
class PassInfo:
    """One rule pass: how the model was traced and what the rule selected."""

    rule_index: int
    rule: str
    transform: str
    trace: str
    trace_error: str | None
    matched: int
    wrong_type: int
    excluded: int


@dataclass
class Plan:
    """Per-target plans of every rule pass, with totals (see :meth:`totals`).

    Once applied with a sample input: ``output_error``, the relative error of the
    model's output (``output_error_name``: which tensor, a Hugging Face model's first,
    e.g. ``output.last_hidden_state``, else the worst), ``output_errors`` (each output
    tensor's) and ``sample_input`` (what it was measured on, when the caller says).
    """

    targets: list[TargetPlan] = field(default_factory=list)
    passes: list[PassInfo] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int | None = None
    model_bytes_before: int | None = None
    output_error: float | None = None
    output_error_name: str | None = None
    output_errors: dict[str, float] | None = None  # every output tensor's error, by name
    sample_input: str | None = None  # what the output error was measured on, in words
    applied: bool = False
    budget: dict[str, Any] | None = None  # the global budget's allocation, when the spec has one
    calibration: dict[str, Any] | None = None  # what calibration ran, when the spec has it
    # how a checkpoint directory was surgered: "blocks" (streamed, one block at a time)
    # or "whole" (the model in memory); None for a model given in memory
    pipeline: str | None = None
    streaming: dict[str, Any] | None = None  # its time, memory peaks and shards

    def replaced(self) -> list[TargetPlan]:
        """Targets that get (or got) a replacement."""
        return [t for t in self.targets if t.status == "replace"]

    def totals(self) -> dict[str, Any]:
        """Sums over the targets, and the whole model's parameter counts."""
        rep = self.replaced()

        def total(attr: str, rows: list[TargetPlan]) -> int | None:
            vals = [getattr(t, attr) for t in rows]
            return None if any(v is None for v in vals) else sum(vals)

        before = total("params_before", rep)
        after = total("params_after", rep)
        model_after = self.model_params_after
        if model_after is None and before is not None and after is not None:
            model_after = self.model_params_before - before + after
        bytes_before, bytes_after = total("bytes_before", rep), total("bytes_after", rep)
        model_bytes_after = None
        if None not in (self.model_bytes_before, bytes_before, bytes_after):
            model_bytes_after = self.model_bytes_before - bytes_before + bytes_after
        return {
            "targets": len(self.targets),
            "replaced": len(rep),
            "skipped": sum(t.status == "skip" for t in self.targets),
            "refused": sum(t.status == "refuse" for t in self.targets),
            "params_before": before,
            "params_after": after,
            "flops_before": total("flops_before", rep),
            "flops_after": total("flops_after", rep),
            "model_params_before": self.model_params_before,
            "model_params_after": model_after,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": model_bytes_after,
            "output_error": self.output_error,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (what ``--json`` prints)."""
        return {
            "targets": [asdict(t) for t in self.targets],
            "passes": [asdict(p) for p in self.passes],
            "totals": self.totals(),
            "output_error_name": self.output_error_name,
            "output_errors": self.output_errors,
            "sample_input": self.sample_input,
            "applied": self.applied,
            "budget": self.budget,
            "calibration": self.calibration,
            "pipeline": self.pipeline,
            "streaming": self.streaming,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan back from :meth:`to_dict` (e.g. from a manifest's ``"plan"``)."""
        totals = d.get("totals", {})
        fields = {f for f in TargetPlan.__dataclass_fields__}
        targets = []
        for t in d.get("targets", []):
            t = {k: v for k, v in t.items() if k in fields}
            if t.get("input_shape") is not None:
                t["input_shape"] = tuple(t["input_shape"])
            if t.get("output_shape") is not None:
                t["output_shape"] = tuple(t["output_shape"])
            targets.append(TargetPlan(**t))
        return cls(
            targets=targets,
            passes=[PassInfo(**x) for x in d.get("passes", [])],
            model_params_before=totals.get("model_params_before", 0),
            model_params_after=totals.get("model_params_after"),
            model_bytes_before=totals.get("model_bytes_before"),
            output_error=totals.get("output_error"),
            output_error_name=d.get("output_error_name"),
            output_errors=d.get("output_errors"),
            sample_input=d.get("sample_input"),
            applied=d.get("applied", False),
            budget=d.get("budget"),
            pipeline=d.get("pipeline"),
            streaming=d.get("streaming"),
            calibration=d.get("calibration"),
        )
