"""A Hugging Face model's skeleton: its class from the config, built with every
parameter on the meta device (no memory, no initialisation cost) and every buffer
real, so that rotary frequencies and position ids computed in ``__init__`` are there.

The class comes only from transformers' fixed auto mappings (:func:`hf_class`), never
from code in the directory (``trust_remote_code`` is always off).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tnsurgery.errors import ModelLoadError
from tnsurgery.io.files import short

__all__ = [
    "checkpoint_names",
    "empty_model",
    "hf_class",
    "hf_model_class_names",
    "params_on_meta",
    "renamer",
]


def hf_model_class_names(transformers: Any) -> set[str]:
    """Every model class name that transformers' auto mappings list: the only classes
    a config's ``architectures`` may name."""
    from transformers.models.auto import modeling_auto  # optional dependency (hf extra)

    names: set[str] = set()
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for v in mapping.values():
                names.update(v if isinstance(v, (tuple, list)) else [v])
    return names


def hf_class(config: Any) -> Any:
    """The model class of a config: one of transformers' model classes named by its
    ``architectures`` (through the fixed auto mappings), else ``AutoModel``."""
    import transformers  # optional dependency (the hf extra)

    known = hf_model_class_names(transformers)
    for name in getattr(config, "architectures", None) or []:
        if not isinstance(name, str) or name not in known:
            continue
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is put on the meta device (a
    parameter already there, e.g. a tied one, is kept as the same object); buffers
    are made as usual."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def read_config(directory: Path) -> Any:
    """The ``config.json`` of a model directory, through transformers (no remote code)."""
    try:
        import transformers  # optional dependency (the hf extra)
    except ImportError:
        raise ModelLoadError(
            f"{directory} is a Hugging Face model directory: pip install transformers"
        ) from None
    try:
        return transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - transformers' errors are many
        raise ModelLoadError(f"{directory}: cannot read config.json: {short(exc)}") from None


def empty_model(directory: Path, config: Any = None) -> nn.Module:
    """The model of ``directory``'s config, parameters on the meta device, buffers real,
    in eval mode. Its parameters take their dtype from the checkpoint when filled."""
    import transformers  # optional dependency (the hf extra)

    config = config if config is not None else read_config(directory)
    cls = hf_class(config)
    try:
        with params_on_meta():
            if cls is transformers.AutoModel:
                model = cls.from_config(config, trust_remote_code=False)
            else:
                model = cls(config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
        raise ModelLoadError(
            f"{directory}: cannot build {cls.__name__} from config.json: {short(exc)}"
        ) from None
    return model.eval()


def renamer(model: nn.Module, keys: Container[str]) -> Callable[[str], str]:
    """How the checkpoint's names (``keys``) read in ``model``: without the base
    model's prefix when ``model`` is the base model of a checkpoint with a head (a
    CausalLM output loaded as AutoModel), with it in the reverse case; as
    transformers renames the tensors it loads."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    inside = isinstance(getattr(model, prefix, None), nn.Module) if prefix else False
    prefixed = any(k.startswith(prefix + ".") for k in keys) if prefix else False
    if prefix and prefixed and not inside:
        return lambda k: k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k
    if prefix and inside and not prefixed:
        return lambda k: f"{prefix}.{k}"
    return lambda k: k


def checkpoint_names(model: nn.Module, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(model name -> checkpoint name, keys that need more than a rename)``: the
    checkpoint's keys read as ``model``'s names, with transformers' own renamings of
    legacy checkpoints (``embed_out`` -> ``lm_head``, ViT's ``encoder.layer`` ->
    ``layers``...) and base-model prefixes; keys that a transformers converter merges
    or splits (fused experts...) are listed apart: such a checkpoint is read whole by
    ``from_pretrained``."""
    rename = renamer(model, keys)
    try:  # transformers >= 5 renames legacy checkpoints as it loads them
        from transformers.conversion_mapping import (  # optional dependency (hf extra)
            get_model_conversion_mapping,
        )
        from transformers.core_model_loading import (  # optional dependency (hf extra)
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return {rename(k): k for k in keys}, []
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    names: dict[str, str] = {}
    converted: list[str] = []
    for k in keys:
        try:
            new, converter = rename_source_key(k, renamings, converters, prefix, meta)
        except Exception:  # noqa: BLE001 - transformers' own renaming failed: ours
            new, converter = rename(k), None
        if converter is not None:
            converted.append(k)
        names[new] = k
    return names, converted
