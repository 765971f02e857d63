"""The dry run of a recorded surgery: every recorded layer replayed on the meta device
and checked against the weights file's header before anything is built for real
(:func:`dry_run`), and the checks it makes: aliases, layer placement, sizes, shapes
and kinds of tensors. :mod:`tnsurgery.io.pairs` (``tnsurgery.load``) and
:mod:`tnsurgery.io.hf_quantizer` (``from_pretrained``) replay through it."""

from __future__ import annotations

import torch
from torch import nn

from tnsurgery.errors import ModelLoadError
from tnsurgery.io.files import short
from tnsurgery.io.manifests import Document, TensorInfo
from tnsurgery.manifest import Replacement
from tnsurgery.swap import Swaps


def dry_run(
    base: nn.Module,
    reps: list[Replacement],
    classes: dict[str, type],
    doc: Document,
    header: dict[str, TensorInfo],
) -> None:
    """Replay every recorded layer on the meta device (nothing allocated), then check
    the result against the weights file's header before anything is built for real:
    every layer's size within what the file can hold, and (when every layer can be
    built on meta) every tensor's name and shape as the header says. ``base`` is left
    as it was."""
    budget = 2 * sum(t.nbytes for t in header.values()) + (64 << 20)
    largest = max((t.numel for t in header.values()), default=0)
    exact = True
    with Swaps(base) as swaps:
        try:
            for i, rep in enumerate(reps):
                field = f"{doc.prefix}replacements[{i}]"
                cls, current = place(base, rep, classes, doc, i)
                _check_placement(rep.config, doc, f"{field}.config", rep.name)
                try:
                    with torch.device("meta"):
                        probe = cls.from_config(rep.config, current)
                except Exception as exc:
                    if not meta_unsupported(exc):
                        raise ModelLoadError(
                            f"{doc.where}: malformed {doc.what}: field '{field}.config' of "
                            f"{rep.name}: {rep.layer} cannot be built from it: {short(exc)}"
                        ) from None
                    # a plugin layer that cannot be built on meta: bound its config's
                    # numbers by the largest tensor of the file instead
                    _check_numbers(rep.config, largest, doc, f"{field}.config", rep.name)
                    exact = False
                    continue
                budget -= _new_bytes(probe, current)
                if budget < 0:
                    raise ModelLoadError(
                        f"{doc.where}: field '{field}.config' of {rep.name} describes a "
                        f"{rep.layer} larger than the weights file {doc.weights.name} can "
                        "hold: refused"
                    )
                swaps.swap(rep.name, probe)
            if exact:
                _check_shapes(base, reps, doc, header)
        finally:
            swaps.rollback()


def check_aliases(doc: Document, header: dict[str, TensorInfo]) -> None:
    """Each alias names a tensor the weights file holds, and is not one itself (an
    alias must never hide a missing tensor, nor replace a stored one)."""
    for alias, target in doc.aliases.items():
        if target not in header or alias in header:
            why = "is also stored" if alias in header else f"names {target}, which is not stored"
            raise ModelLoadError(f"{doc.where}: alias {alias} {why} in {doc.weights.name}: refused")


PLACEMENT_KEYS = frozenset({"device", "dtype", "factory_kwargs", "device_map"})
"""Constructor arguments a recorded config never holds: where and in what a layer is
built is the loader's choice (a ``device`` would escape the meta-device dry run)."""


def _check_placement(config: object, doc: Document, field: str, name: str) -> None:
    bad = sorted(PLACEMENT_KEYS & set(config)) if isinstance(config, dict) else []
    if bad:
        raise ModelLoadError(
            f"{doc.where}: field '{field}' of {name} holds {', '.join(bad)}: a recorded "
            "layer config never says where or in what dtype to build it; refused"
        )


def _check_shapes(
    model: nn.Module, reps: list[Replacement], doc: Document, header: dict[str, TensorInfo]
) -> None:
    """The model's tensors (recorded layers built on meta) against the header."""
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    stored = {k: t.shape for k, t in header.items()}
    for alias, target in doc.aliases.items():
        if target in stored:
            stored[alias] = stored[target]
    owners = {r.name: i for i, r in enumerate(reps)}  # the last record of each name
    for key, shape in expected.items():
        got = stored.get(key)
        kind = header[key].dtype if key in header else None
        if key in doc.aliases and doc.aliases[key] in header:
            kind = header[doc.aliases[key]].dtype
        if kind is not None and _kind(kind) != _tensor_kind(state[key]):
            raise ModelLoadError(
                f"{doc.weights}: tensor {key} is stored as {kind}, where the model holds "
                f"{state[key].dtype}: refused (it would be cast silently)"
            )
        if key in doc.aliases and got != shape:  # (an alias stands for a tensor of its shape)
            raise ModelLoadError(
                f"{doc.where}: alias {key} names {doc.aliases[key]}, of shape "
                f"{list(got) if got else None}, where the model holds {list(shape)}: refused"
            )
        owner = max((n for n in owners if key.startswith(n + ".")), key=len, default=None)
        if got == shape or owner is None:  # the base model's own tensors: checked on load
            continue
        problem = "is missing from" if got is None else f"is {list(got)} in"
        raise ModelLoadError(
            f"{doc.where}: field '{doc.prefix}replacements[{owners[owner]}].config' of {owner} "
            f"gives tensor "
            f"{key} the shape {list(shape)}, which {problem} {doc.weights.name}: the manifest "
            "and the weights do not agree"
        )


def _new_bytes(probe: nn.Module, current: nn.Module | None) -> int:
    """Bytes of the tensors ``probe`` holds that ``current`` (the module it wraps, if
    any) did not: on the meta device or not, all count against the budget."""
    old = {id(t) for t in (*current.parameters(), *current.buffers())} if current else set()
    tensors = (*probe.parameters(), *probe.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in old)


def meta_unsupported(exc: Exception) -> bool:
    """Whether ``exc`` says a layer cannot be built on the meta device."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc)


def _check_numbers(value, bound: int, doc: Document, field: str, name: str) -> None:
    """Every integer in a config at most ``bound`` (the largest tensor of the file)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > bound:
        raise ModelLoadError(
            f"{doc.where}: field '{field}' of {name} holds {value}, larger than any tensor of "
            f"{doc.weights.name}: refused"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, bound, doc, f"{field}.{k}", name)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(v, bound, doc, f"{field}[{i}]", name)


def _kind(dtype: str) -> str:
    """float, int, bool or complex, for a safetensors dtype name (F32, BF16, F8_E4M3...)."""
    if dtype == "BOOL":
        return "bool"
    if dtype.startswith("C"):
        return "complex"
    return "float" if dtype.startswith(("F", "BF")) else "int"


def _tensor_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "int"


def place(
    base: nn.Module, rep: Replacement, classes: dict[str, type], doc: Document, index: int
) -> tuple[type, nn.Module | None]:
    """The class of a recorded layer (an installed plugin's) and the module now at its
    place in ``base``."""
    cls = classes.get(rep.layer)
    if cls is None:
        raise ModelLoadError(
            f"{doc.where}: layer {rep.layer} (for {rep.name}, transform '{rep.transform}') is "
            "not provided by any installed plugin: install the plugin that registers that "
            "transform"
        )
    parent_name, _, attr = rep.name.rpartition(".")
    try:
        parent = base.get_submodule(parent_name) if parent_name else base
        current = parent._modules[attr]
    except (AttributeError, KeyError):
        raise ModelLoadError(
            f"{doc.where}: the base model has no module {rep.name} "
            f"({doc.prefix}replacements[{index}].name): is it the right architecture?"
        ) from None
    return cls, current
