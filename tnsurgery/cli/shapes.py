"""Shapes on the command line: ``--sample-input 8x3x32x32``, and what a model takes,
in words, for a message about a sample input it cannot take."""

from __future__ import annotations

import math

from torch import nn

from tnsurgery.errors import UserInputError

MAX_SAMPLE_ELEMENTS = 2**28  # a random sample input of at most 1 GiB of float32


def parse_shape(text: str) -> tuple[int, ...]:
    """``8x3x32x32`` -> ``(8, 3, 32, 32)``: positive sizes, at most
    :data:`MAX_SAMPLE_ELEMENTS` elements in all."""
    parts = text.lower().split("x")
    if not parts or len(parts) > 8 or not all(p.isdigit() and len(p) <= 12 for p in parts):
        raise UserInputError(f"--sample-input: bad shape {text!r} (expected e.g. 8x3x32x32)")
    dims = tuple(int(d) for d in parts)
    if any(d <= 0 for d in dims):
        raise UserInputError(f"--sample-input: bad shape {text!r} (every size at least 1)")
    if math.prod(dims) > MAX_SAMPLE_ELEMENTS:
        raise UserInputError(
            f"--sample-input: shape {text!r} has more than {MAX_SAMPLE_ELEMENTS:,} elements"
        )
    return dims


def max_positions(config: object) -> int | None:
    """The longest sequence a Hugging Face config allows, when it says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def expected_input(model: nn.Module) -> str | None:
    """What ``model`` takes, in words, with a ``--sample-input`` that fits, when it can
    be said: a Hugging Face model by its config (token ids, pixel values); another by
    the first layer it registers (which is usually, not always, the first it runs)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is not None:
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int):
            positions = max_positions(config)
            longest = f", at most {positions} a sequence" if positions else ""
            decoder = (
                " and decoder inputs (added for you to a dict with input_ids)"
                if getattr(config, "is_encoder_decoder", False)
                else ""
            )
            return (
                f"{name} takes token ids (input_ids: integers below its vocabulary of "
                f"{vocab:,}{longest}){decoder}: e.g. --sample-input int:2x16:{vocab}, a .txt "
                "file of sentences, or no --sample-input (built-in sentences through its "
                "tokenizer)"
            )
        channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
        if isinstance(channels, int) and isinstance(size, int):
            return (
                f"{name} takes pixel_values of shape N x {channels} x {size} x {size}: "
                f"e.g. --sample-input 2x{channels}x{size}x{size}"
            )
    for where, m in model.named_modules():
        hint = _first_layer_hint(m)
        if hint is not None:
            return f"its first layer ({where or 'the model'}, {type(m).__name__}) {hint}"
    return None


def _first_layer_hint(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        n = m.in_features
        return f"takes inputs whose last size is {n}: e.g. --sample-input 8x{n}"
    if isinstance(m, nn.Embedding):
        n = m.num_embeddings
        return f"takes token ids below {n:,}: e.g. --sample-input int:2x16:{n}"
    examples = {
        nn.Conv1d: ("N x C x L", "8x{c}x128"),
        nn.Conv2d: ("N x C x H x W", "8x{c}x32x32"),
        nn.Conv3d: ("N x C x D x H x W", "8x{c}x8x32x32"),
    }
    for cls, (dims, shape) in examples.items():
        if isinstance(m, cls):
            c = m.in_channels
            return (
                f"takes {dims} inputs with C = {c} channels: e.g. --sample-input "
                f"{shape.format(c=c)}"
            )
    return None
