"""Export: each layer a transform knows how to deploy (``Transform.export``; the
``qat`` transform's ``QATLayer`` becomes a ``QuantizedLayer`` storing integers) is
replaced by its exported form, all or nothing, and the manifest records it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tnsurgery.compare import output_error
from tnsurgery.errors import SurgeryError, UserInputError
from tnsurgery.manifest import Manifest, Replacement
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.swap import Swaps, copy_model
from tnsurgery.tracing import call_model, eval_mode, tensor_bytes
from tnsurgery.transform import Transform, qualified_name, relative_error


def convert(
    model: nn.Module,
    sample_input: Any = None,
    *,
    inplace: bool = False,
    registry: Registry | None = None,
) -> nn.Module:
    """Export the trained layers of ``model``: every layer some transform exports
    (``qat``'s ``QATLayer`` becomes a ``QuantizedLayer`` storing integer tensors,
    packed to ``bits`` per value below 8 bits, with scales and zero points,
    dequantized on the fly: the outputs of the fake-quant layer).

    Args:
        model: a model surgered with a ``qat`` rule (and possibly trained).
        sample_input: when given, the exported model's output is compared with
            the model's (``output_error`` in the manifest); quantizers of inputs
            observe it first.
        inplace: modify ``model`` itself (rolled back on failure); else a copy.
        registry: the transforms to ask (installed plugins by default).

    Returns:
        The exported model. Its manifest records the conversion (each layer's
        bytes before/after, ``model_bytes_before``/``model_bytes_after``) on top
        of the surgery's, so :func:`tnsurgery.save` / :func:`tnsurgery.load`
        round-trip it.

    Raises:
        UserInputError: the model has nothing to export, or a layer cannot be
            exported yet (e.g. an input quantizer that never saw data).
        SurgeryError: a layer failed to export; the model is untouched.
    """
    registry = registry or get_registry()
    exporters = [t for t in registry.transforms.values() if t.export is not None and t.exports]
    targets = _outermost(model, exporters)
    if not targets:
        raise UserInputError(
            "nothing to export: the model has no QAT layer (apply a spec with a 'qat' rule first)"
        )
    work = model if inplace else copy_model(model)
    reference_model = copy_model(model) if (inplace and sample_input is not None) else model
    if sample_input is not None:  # input quantizers that never saw an input observe it now
        with eval_mode(work):
            call_model(work, sample_input)
    bytes_before = tensor_bytes(work)
    records = []
    with Swaps(work) as swaps:
        for name, transform in targets:
            old = work.get_submodule(name)
            new, err = _export_one(transform, name, old)
            swaps.swap(name, new)
            records.append(
                Replacement(
                    name=name,
                    transform=transform.name,
                    operation="convert",
                    layer=qualified_name(type(new)),
                    config=new.config(),
                    bytes_before=tensor_bytes(old),
                    bytes_after=tensor_bytes(new),
                    weight_error=err,
                )
            )
        out_err = out_name = None
        if sample_input is not None:
            with eval_mode(reference_model, work):
                reference = call_model(reference_model, sample_input)
                exported = call_model(work, sample_input)
            out_err, out_name = output_error(reference, exported)
    previous = Manifest.of(work)
    manifest = Manifest(
        base_model=previous.base_model if previous else qualified_name(type(work)),
        operation="convert",
        spec=previous.spec if previous else None,
        replacements=records,
        output_error=out_err,
        output_error_name=out_name,
        model_bytes_before=bytes_before,
        model_bytes_after=tensor_bytes(work),
    ).after(previous)
    manifest.attach(work)
    return work


def _outermost(model: nn.Module, exporters: list[Transform]) -> list[tuple[str, Transform]]:
    """Modules some transform exports, outermost only (a wrapper's inner layer is
    exported with it), with the transform that exports each."""
    found: list[tuple[str, Transform]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        for t in exporters:
            if isinstance(module, t.exports):
                found.append((name, t))
                break
    return found


def _export_one(transform: Transform, name: str, old: nn.Module) -> tuple[nn.Module, float | None]:
    try:
        new = transform.export(old)
    except UserInputError as exc:
        raise UserInputError(f"cannot export {name}: {exc}") from None
    except Exception as exc:
        raise SurgeryError(f"failed to export {name}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(new, transform.layers) or not hasattr(new, "config"):
        raise SurgeryError(
            f"transform '{transform.name}' exported a {type(new).__name__} for {name}, "
            "which is not one of its declared layers"
        )
    try:
        with torch.no_grad():
            err = relative_error(new.to_dense(), old.to_dense())
    except NotImplementedError:
        err = None
    except Exception as exc:
        raise SurgeryError(f"failed to export {name}: {type(exc).__name__}: {exc}") from exc
    return new, err
