"""``qat``: wrap layers for quantization-aware training (fake quantization).

Any ``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D`` (GPT-2: per channel along
its weight's output axis, 1) or layer made by another transform
(``factorize``, ``tt``, ``tucker``, ``cp``) becomes a
:class:`~tnsurgery.layers.qat.QATLayer`: each of its weight tensors (each
low-rank factor, TT core, Tucker core and factor, CP factor) gets its own
quantizer, per channel along the axis the layer declares, and the forward
runs on the fake-quantized tensors with a straight-through gradient. A rule
with ``qat`` can follow a rule that decomposed the same layers.
:func:`tnsurgery.surgery.convert` (``tnsurgery export``) then stores the
integers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tnsurgery.decompositions.conv1d import Conv1D, linear_weight
from tnsurgery.errors import UserInputError
from tnsurgery.hookspecs import hookimpl
from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.qat import QATLayer, QuantizedLayer, quant_axes
from tnsurgery.tracing import module_flops
from tnsurgery.transform import Context, Decision, Transform, relative_error


class QatParams(BaseModel):
    """Params of ``qat``: how weights (and optionally inputs) are fake-quantized."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(8, ge=2, le=8, strict=True, description="Weight bits (2 to 8).")
    scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric",
        description="'symmetric': signed range, zero point 0; 'asymmetric': unsigned "
        "range with a zero point (also used for the input).",
    )
    granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_channel",
        description="One scale per tensor, or per slice along each tensor's channel axis.",
    )
    observer: Literal["minmax", "ema"] = Field(
        "minmax",
        description="How ranges are observed: 'minmax' (weights: current range; inputs: "
        "running range) or 'ema' (moving average of each batch's range).",
    )
    learn_scale: bool = Field(
        False, description="Learn the scales by gradient (LSQ) after observing them once."
    )
    activations: int | None = Field(
        None,
        ge=2,
        le=8,
        strict=True,
        description="Also fake-quantize the layer's input to this many bits (per tensor); "
        "null leaves it in float.",
    )


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight ``module`` computes with (rebuilt for surgery layers; a Conv1D's
    as the ``(out, in)`` Linear it computes, as ``QATLayer.to_dense`` gives it)."""
    if isinstance(module, SurgeryLayer):
        return module.to_dense()
    return linear_weight(module)


def plan(module: nn.Module, params: QatParams, ctx: Context) -> Decision:
    """Wrap (on the module's own tensors, unchanged) and measure the quantization error."""
    if isinstance(module, (QATLayer, QuantizedLayer)):
        return Decision(skip_reason=f"already quantized ({type(module).__name__})")
    axes = quant_axes(module)
    if not axes:
        return Decision(
            skip_reason=f"{type(module).__name__} declares no tensor to quantize (quant_axes)"
        )
    layer = QATLayer(module, **params.model_dump())
    with torch.no_grad():
        err = relative_error(layer.to_dense(), dense_weight(module))
    resolved = {
        **params.model_dump(),
        "quantized": {
            n: (a if params.granularity == "per_channel" else None) for n, a in axes.items()
        },
    }
    params_after = sum(p.numel() for p in layer.parameters())
    return Decision(
        resolved=resolved,
        params_after=params_after,
        flops_after=module_flops(layer, ctx.input_shape),
        predicted_error=err,
        bytes_after=layer.quantized_bytes(),
        state=layer,
    )


def build(module: nn.Module, params: QatParams, ctx: Context) -> nn.Module:
    """The wrapper :func:`plan` made (made again when called without a plan)."""
    decision = ctx.decision if ctx.decision is not None else plan(module, params, ctx)
    if decision.skip_reason:
        raise ValueError(f"cannot apply qat to {ctx.name}: {decision.skip_reason}")
    return decision.state


def export(layer: QATLayer) -> QuantizedLayer:
    """The integer layer of a trained :class:`QATLayer` (see ``QuantizedLayer.from_qat``);
    refuses a layer whose input quantizer never saw an input (it has no scale)."""
    q = layer.input_quantizer
    if q is not None and not bool(q.observed):
        raise UserInputError(
            "its input quantizer has never seen an input, so it has no scale; run the "
            "model on data (train, or give a sample input: convert(model, sample_input) "
            "/ --sample-input) before exporting"
        )
    return QuantizedLayer.from_qat(layer)


@hookimpl
def register_transforms(register):
    """Register ``qat``."""
    register(
        Transform(
            name="qat",
            params_model=QatParams,
            module_types=(nn.Linear, nn.Conv2d, Conv1D, SurgeryLayer),
            build=build,
            plan=plan,
            layers=(QATLayer, QuantizedLayer),
            export=export,
            exports=(QATLayer,),
            description="Fake quantization for QAT (per tensor of every factor/core, STE); "
            "`tnsurgery export` stores the integer weights.",
        )
    )
