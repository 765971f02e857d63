"""The sample input of ``plan``, ``apply`` and ``export``: what ``--sample-input`` names,
or the default, and what it is, in words (reported beside the output error).

The default, when no ``--sample-input`` is given:

1. the spec's evaluation data (``training.eval_data``): its first examples;
2. the spec's calibration data: examples after the ``samples`` the calibration uses
   (held out);
3. a Hugging Face text model: the built-in sentences (``tnsurgery/data/sentences.txt``)
   through the tokenizer in the model's directory, or, with no tokenizer there, random
   token ids, with a warning;
4. the first calibration batch (what calibration also runs on), else none.

Encoder-decoder models get decoder inputs: the same ids, shifted right after the
decoder's start token. Text goes through the registered ``text`` data source (its
bounds on files and tokenizer directories), never a source of its own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery import io
from tnsurgery.cli.app import err, shown
from tnsurgery.cli.shapes import expected_input, max_positions, parse_shape
from tnsurgery.compare import SampleInputError, check_sample_input
from tnsurgery.data import batches, examples_in, slice_batch, to_device
from tnsurgery.errors import UserInputError
from tnsurgery.spec import Spec

SAMPLE_EXAMPLES = 16
MAX_DEFAULT_ELEMENTS = 2**24
"""Most values of a default speech or vision sample built from a config (64 MiB of
float32; Whisper's is 480,000, a 224-pixel image batch 301,056)."""
MAX_DEFAULT_LENGTH = 8192
"""Longest side (frames, pixels) of such a sample: attention is quadratic in it
(Whisper's is 3,000 frames)."""
"""Examples of a default sample input (held-out or evaluation data, built-in sentences)."""
MAX_SAMPLE_LINES = 64
"""Most lines of a ``.txt`` sample input used (one forward pass runs on all of them)."""
MAX_SAMPLE_TOKENS = 128
"""Tokens of one sentence, at most (and never past the model's positions)."""
RANDOM_IDS_SHAPE = (2, 16)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
FORMS = (
    "--sample-input takes a shape like 8x3x32x32 (random floats), int:2x16:VOCAB (random "
    "token ids), a .txt file (one sentence a line, through the model's tokenizer), a .pt or "
    ".safetensors file of tensors (a tensor, a tuple of positional inputs or a dict of "
    "keyword inputs), or 'auto'; --no-sample-input runs without one"
)


@dataclass
class Sample:
    """A sample input (``value``: a tensor, tuple or dict; ``None``: none) and what it
    is, in words (``described``, e.g. "16 built-in sentences")."""

    value: Any
    described: str | None


def resolve_sample(
    text: str | None,
    loaded: io.LoadedModel | None,
    disabled: bool = False,
    spec: Spec | None = None,
) -> Sample:
    """``--sample-input`` as tensors, with what it is (see the option's help and the
    module's docstring for the default, which uses ``spec``'s data when it has some)."""
    if disabled:
        return Sample(None, None)
    sample = named_sample(text, loaded, spec)
    model = loaded.model if loaded else None
    value = with_decoder_inputs(sample.value, model)
    if value is not sample.value:
        return Sample(value, f"{sample.described}; decoder inputs: the same ids, shifted right")
    return sample


def named_sample(text: str | None, loaded: io.LoadedModel | None, spec: Spec | None) -> Sample:
    """What ``--sample-input`` names (``None``, ``auto``: the default)."""
    model = loaded.model if loaded else None
    if text is None or text == "auto":
        sample = default_sample(loaded, spec)
        if text == "auto" and sample.value is None:
            raise UserInputError(
                "--sample-input auto: no automatic sample input for this model (not a "
                "Hugging Face text model, and the spec has no calibration or evaluation "
                f"data). {FORMS}"
            )
        return sample
    g = torch.Generator().manual_seed(0)
    if text.startswith("int:"):
        parts = text.split(":")
        if len(parts) != 3:
            raise UserInputError("--sample-input int:SHAPE:HIGH, e.g. int:2x16:30522")
        high_text = parts[2]
        if not high_text.isdigit() or len(high_text) > 12 or int(high_text) < 1:
            raise UserInputError(
                f"--sample-input: bad upper bound {high_text!r} (a vocabulary size, at least 1)"
            )
        shape = parse_shape(parts[1])
        ids = torch.randint(0, int(high_text), shape, generator=g)
        what = f"random token ids of shape {parts[1]}, below {high_text}"
        return Sample(ids_batch(ids) if text_model(model) and ids.dim() == 2 else ids, what)
    path = Path(text)
    if path.suffix.lower() == ".txt":
        return text_sample(path, loaded)
    if path.exists():
        return Sample(tensors_file(path, model), f"the tensors in {path}")
    if any(c.isdigit() for c in text) and set(text.lower()) <= set("0123456789x"):
        shape = parse_shape(text)
        ref = next(iter(model.parameters()), None) if model is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        return Sample(torch.randn(shape, generator=g).to(dtype), f"random floats of shape {text}")
    raise UserInputError(
        f"--sample-input {text!r}: no such file, and not a shape like 8x3x32x32. {FORMS}"
    )


def resolve_sample_input(
    text: str | None, loaded: io.LoadedModel | None, disabled: bool = False
) -> Any:
    """The tensors of :func:`resolve_sample` (no spec: no held-out data)."""
    return resolve_sample(text, loaded, disabled).value


def check_sample(model: nn.Module, sample: Sample) -> None:
    """Run ``model`` once on the sample input: one it cannot take (a wrong shape or
    dtype, missing inputs) is a :class:`UserInputError` that says what the sample input
    was, what the model takes where that can be said, and the ``--sample-input`` forms."""
    if sample.value is None:
        return
    try:
        check_sample_input(model, sample.value)
    except SampleInputError as exc:
        lines = [f"the model fails on the sample input ({sample.described}): {exc.cause}"]
        hint = expected_input(model)
        if hint:
            lines.append(hint)
        lines.append(FORMS)
        raise UserInputError("\n".join(lines)) from None


# ------------------------------------------------------------------ the default


def default_sample(loaded: io.LoadedModel | None, spec: Spec | None) -> Sample:
    """The sample input when none is named (see the module's docstring)."""
    model = loaded.model if loaded else None
    note = None
    if loaded is not None and spec is not None:
        t = spec.training
        if t is not None and t.eval_data and t.eval_data.get("source") != "random":
            value = drawn(t.eval_data, loaded, t.batch_size, 0, t.seed)
            if value is not None:
                n = examples_in(value)
                return Sample(value, f"{n} examples of the evaluation data (training.eval_data)")
        cal = spec.calibration
        if cal is not None and cal.data.get("source") != "random":
            value = drawn(cal.data, loaded, cal.batch_size, cal.samples, cal.seed)
            if value is not None:
                n = examples_in(value)
                return Sample(
                    value,
                    f"{n} held-out examples of the calibration data (after the "
                    f"{cal.samples} it calibrates on)",
                )
            note = "the calibration uses all of its data: none held out"
    features = features_sample(model)
    if features is not None:  # (speech and vision models: not text, whatever their vocab)
        return features
    if loaded is not None and text_model(model):
        return sentences_sample(loaded, note)
    if spec is not None and spec.calibration is not None:
        cal = spec.calibration
        n = min(cal.batch_size, cal.samples)
        # surgery itself runs on calibration's first batch when given no sample input
        return Sample(None, f"the first calibration batch (up to {n} examples it calibrates on)")
    return Sample(None, None)


def features_sample(model: nn.Module | None) -> Sample | None:
    """Random inputs of the shape a Hugging Face speech or vision model takes, from its
    config (``main_input_name``: Whisper's ``input_features`` with decoder inputs, a
    ViT's ``pixel_values``); ``None`` for other models."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    g = torch.Generator().manual_seed(0)
    shape = _config_shape(config, main)
    if shape is None:
        return None
    if math.prod(shape) > MAX_DEFAULT_ELEMENTS or max(shape[2:]) > MAX_DEFAULT_LENGTH:
        raise UserInputError(
            f"the model's config asks for {main} of shape {'x'.join(map(str, shape))}, more "
            f"than {MAX_DEFAULT_ELEMENTS:,} values or a side over {MAX_DEFAULT_LENGTH:,} "
            f"for a default sample input: give one with --sample-input. {FORMS}"
        )
    described = "x".join(map(str, shape))
    value = {str(main): torch.randn(shape, generator=g)}
    if main == "pixel_values":
        return Sample(to_device(value, model), f"random images of shape {described}")
    start = getattr(config, "decoder_start_token_id", None)
    if getattr(config, "is_encoder_decoder", False) and isinstance(start, int):
        value["decoder_input_ids"] = torch.full((2, 4), start, dtype=torch.long)
    return Sample(to_device(value, model), f"random input features of shape {described}")


def _config_shape(config: object, main: object) -> tuple[int, ...] | None:
    """The shape of a default speech or vision sample, from the config's sizes."""
    def size(name: str) -> int | None:
        value = getattr(config, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if main == "input_features":
        mels, frames = size("num_mel_bins"), size("max_source_positions")
        if mels is not None and frames is not None and mels > 0 and frames > 0:
            return (2, mels, 2 * frames)
    if main == "pixel_values":
        channels, side = size("num_channels"), size("image_size")
        if channels is not None and side is not None and channels > 0 and side > 0:
            return (2, channels, side, side)
    return None


def drawn(
    data: dict[str, Any], loaded: io.LoadedModel, batch_size: int, skip: int, seed: int
) -> Any:
    """Up to :data:`SAMPLE_EXAMPLES` examples of a spec's ``data`` after its first
    ``skip`` (the batches drawn as calibration draws them), as one batch; ``None``
    when the data holds no more."""
    model = loaded.model
    kept: list[Any] = []
    seen = 0
    stream = batches(data, model, batch_size, skip + SAMPLE_EXAMPLES, seed)
    with contextlib.closing(stream):
        for batch in stream:
            n = examples_in(batch)
            if seen + n > skip:
                kept.append(slice_batch(batch, max(0, skip - seen), n))
            seen += n
    if not kept:
        return None
    return to_device(merged(kept), model)


def sentences_sample(loaded: io.LoadedModel, note: str | None) -> Sample:
    """The built-in sentences through the model's tokenizer; random token ids (said,
    on stderr and in the description) when the model's directory has none."""
    model = loaded.model
    where = loaded.path if loaded.kind == "hf" and loaded.path.is_dir() else None
    why = None
    if where is None:
        why = "the model is not a Hugging Face directory, which holds a tokenizer"
    elif not any((where / name).is_file() for name in TOKENIZER_FILES):
        why = f"no tokenizer in {where}"
    else:
        source = resources.files("tnsurgery").joinpath("data/sentences.txt")
        try:
            with resources.as_file(source) as path:
                value, n = tokenized(path, where, model, SAMPLE_EXAMPLES)
        except UserInputError as exc:
            why = f"the tokenizer in {where} cannot be used: {exc}"
        else:
            what = f"{n} built-in sentences"
            return Sample(value, f"{what} ({note})" if note else what)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, RANDOM_IDS_SHAPE, generator=torch.Generator().manual_seed(0))
    shape = "x".join(map(str, RANDOM_IDS_SHAPE))
    err.print(
        f"[yellow]warning:[/] {shown(why)}: the sample input is random token ids, on which "
        "the output error says little about real text; give --sample-input FILE.txt (one "
        "sentence a line) or a tokenizer in the model's directory",
        highlight=False,
    )
    return Sample(ids_batch(ids), f"{shape} random token ids ({why})")


# ------------------------------------------------------------------- text files


def text_sample(path: Path, loaded: io.LoadedModel | None) -> Sample:
    """A ``.txt`` sample input: its first :data:`MAX_SAMPLE_LINES` non-empty lines
    through the Hugging Face model's tokenizer (read within the ``text`` source's
    bounds)."""
    model = loaded.model if loaded else None
    if loaded is None or not text_model(model) or loaded.kind != "hf":
        raise UserInputError(
            f"--sample-input {path}: a text file is for a Hugging Face text model read from "
            f"its directory (with its tokenizer). {FORMS}"
        )
    if not path.exists():
        raise UserInputError(f"--sample-input {path}: no such file. {FORMS}")
    try:
        value, n = tokenized(path, loaded.path, model, MAX_SAMPLE_LINES + 1)
    except UserInputError as exc:
        raise UserInputError(f"--sample-input {path}: {exc}") from None
    if n > MAX_SAMPLE_LINES:
        value = slice_batch(value, 0, MAX_SAMPLE_LINES)
        return Sample(value, f"the first {MAX_SAMPLE_LINES} lines of {path}")
    return Sample(value, f"{n} line{'s' if n != 1 else ''} of {path}")


def tokenized(path: Path, tokenizer: Path, model: nn.Module, lines: int) -> tuple[Any, int]:
    """The first ``lines`` non-empty lines of ``path``, tokenized (one padded batch)
    by the registered ``text`` data source, decoder inputs added; and how many."""
    data = {
        "source": "text",
        "path": str(path),
        "tokenizer": str(tokenizer),
        "max_length": min(MAX_SAMPLE_TOKENS, max_positions(model.config) or MAX_SAMPLE_TOKENS),
    }
    stream = batches(data, model, batch_size=lines, samples=lines)
    with contextlib.closing(stream):
        batch = next(iter(stream), None)
    if batch is None:
        raise UserInputError(f"{path} has no non-empty line")
    return to_device(batch, model), examples_in(batch)


# ----------------------------------------------------------------- batch helpers


def text_model(model: nn.Module | None) -> bool:
    """A Hugging Face model that takes token ids (its config has a ``vocab_size``)."""
    config = getattr(model, "config", None)
    return isinstance(getattr(config, "vocab_size", None), int)


def ids_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids as a Hugging Face batch (nothing masked)."""
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def with_decoder_inputs(batch: Any, model: nn.Module | None) -> Any:
    """For an encoder-decoder model, ``batch`` (a dict with ``input_ids``) with decoder
    inputs: the same ids shifted right after the decoder's start token, and the mask
    shifted alike; any other batch as it is."""
    config = getattr(model, "config", None)
    if (
        not getattr(config, "is_encoder_decoder", False)
        or not isinstance(batch, dict)
        or not isinstance(batch.get("input_ids"), torch.Tensor)
        or batch["input_ids"].dim() != 2
        or any(k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels"))
    ):
        return batch
    ids = batch["input_ids"]
    start = next(
        (
            v
            for v in (getattr(config, k, None) for k in ("decoder_start_token_id", "pad_token_id"))
            if isinstance(v, int) and v >= 0
        ),
        0,
    )
    first = torch.full((ids.shape[0], 1), start, dtype=ids.dtype, device=ids.device)
    out = {**batch, "decoder_input_ids": torch.cat([first, ids[:, :-1]], 1)}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        out["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1)
    return out


def merged(parts: list[Any]) -> Any:
    """Batches joined along dim 0: dict batches of token ids padded on the right to
    the longest (masked out); the batches up to the first that cannot join otherwise."""
    out = parts[0]
    for part in parts[1:]:
        joined = joined_pair(out, part)
        if joined is None:
            break
        out = joined
    return out


def joined_pair(a: Any, b: Any) -> Any:
    """``a`` and ``b`` along dim 0, or ``None`` when they do not fit together."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        ok = a.dim() > 0 and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
        return torch.cat([a, b]) if ok else None
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        masked = isinstance(a.get("attention_mask"), torch.Tensor)
        out = {}
        for k in a:
            x, y = a[k], b[k]
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return None
            if masked and x.dim() == y.dim() == 2 and x.shape[1] != y.shape[1]:
                width = max(x.shape[1], y.shape[1])
                x, y = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (x, y))
            out[k] = joined_pair(x, y)
            if out[k] is None:
                return None
        return out
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        out_t = tuple(joined_pair(x, y) for x, y in zip(a, b, strict=True))
        return None if any(t is None for t in out_t) else out_t
    return None


def tensors_file(path: Path, model: nn.Module | None) -> Any:
    """The tensors of a ``.pt`` (read without running code) or ``.safetensors`` file:
    a tensor, a tuple of positional inputs or a dict of keyword inputs (scalars and
    ``None`` allowed beside the tensors)."""
    if path.suffix == ".safetensors":
        obj: Any = io.read_safetensors(path)[0]
    else:
        obj = io.torch_load_safely(path)
    if isinstance(obj, list):
        obj = tuple(obj)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, dict)):
        values = list(obj.values()) if isinstance(obj, dict) else list(obj)
        keys = list(obj) if isinstance(obj, dict) else range(len(values))
        for key, v in zip(keys, values, strict=True):
            if not isinstance(v, (torch.Tensor, bool, int, float, type(None))):
                where = f"[{key!r}]" if isinstance(obj, dict) else f"[{key}]"
                raise UserInputError(
                    f"--sample-input {path}: {where} is a {type(v).__name__}, not a tensor. {FORMS}"
                )
        if isinstance(obj, dict) and not all(isinstance(k, str) for k in obj):
            raise UserInputError(f"--sample-input {path}: a dict's keys are keyword names")
        if not any(isinstance(v, torch.Tensor) for v in values):
            raise UserInputError(f"--sample-input {path}: holds no tensor. {FORMS}")
        return obj
    raise UserInputError(
        f"--sample-input {path}: expected tensors, got {type(obj).__name__}. {FORMS}"
    )
