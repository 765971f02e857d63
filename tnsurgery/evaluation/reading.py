"""Evaluation data read once for a model (:func:`read_data`), what is known of a
model from its config (causal LM, positions, vocabulary, directory), and whether two
models read token ids alike (:func:`check_comparable`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnsurgery.data import batches as data_batches
from tnsurgery.data import split
from tnsurgery.errors import UserInputError
from tnsurgery.plugins import Registry, get_registry

MAX_WINDOW = 1024
"""The default window's cap (tokens), whatever the model's maximum positions."""
TEXT_MAX_LENGTH = 1 << 20
"""Tokens a line of a text source may hold when the data does not set ``max_length``
(the sources' default, 128, would cut the text a perplexity is measured on)."""
POSITIONS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length")


@dataclass
class EvalData:
    """Evaluation data read once: token sequences (perplexity) or batches (cosine,
    accuracy), and how the model takes them (keyword ``input_ids``, or positionally)."""

    metric: str
    keyword: bool
    sequences: list[torch.Tensor] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    stream: bool = False


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (``*ForCausalLM``, ``*LMHeadModel``), known
    by its class name (transformers is never imported here)."""
    config = getattr(model, "config", None)
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return causal and not getattr(config, "is_encoder_decoder", False)


def max_positions(model: nn.Module) -> int | None:
    """The longest input a Hugging Face model's config allows (``None`` if it says not)."""
    config = getattr(model, "config", None)
    for name in POSITIONS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_window(model: nn.Module) -> int:
    """The model's maximum positions, at most :data:`MAX_WINDOW` (that when unknown)."""
    return min(max_positions(model) or MAX_WINDOW, MAX_WINDOW)


def _config_id(model: nn.Module, name: str) -> int | None:
    value = getattr(getattr(model, "config", None), name, None)
    return value if isinstance(value, int) else None


def vocab_size(model: nn.Module) -> int | None:
    """Rows of a Hugging Face model's input embedding (else its config's vocab_size)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # a model without one (NotImplementedError...)
        emb = None
    rows = getattr(emb, "num_embeddings", None)
    return rows if isinstance(rows, int) else _config_id(model, "vocab_size")


# ----------------------------------------------------------------------- data


def _source_is_text(data: dict[str, Any], registry: Registry) -> bool:
    try:
        source = registry.get_data_source(data.get("source"))
    except KeyError as exc:
        raise UserInputError(f"data: {exc.args[0]}") from None
    return "tokenizer" in source.params_model.model_fields


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a model directory holds at least one when it holds a tokenizer."""


def _check_has_tokenizer(model: nn.Module) -> None:
    """A model directory with no tokenizer file is refused before its text is read:
    transformers would build an empty tokenizer there, which gives no token at all."""
    where = model_directory(model)
    if where is not None and not any((where / name).is_file() for name in TOKENIZER_FILES):
        raise UserInputError(
            f"evaluation: the model's directory {where} holds no tokenizer ("
            + ", ".join(TOKENIZER_FILES[:4])
            + "...) to read the text with: give token ids (a .pt / .safetensors file of "
            "input_ids), or a data source with 'tokenizer' (a directory)"
        )


def _ids_of(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's token ids ``(rows, tokens)`` and its attention mask."""
    if isinstance(batch, dict):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    else:
        ids, mask = (batch[0] if isinstance(batch, (tuple, list)) else batch), None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
        what = "a dict without 'input_ids'" if ids is None else f"{getattr(ids, 'dtype', ids)}"
        raise UserInputError(
            f"evaluation: perplexity needs integer token ids (rows, tokens); the data gives {what}"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = mask.reshape(1, -1) if isinstance(mask, torch.Tensor) else None
    if isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
        raise UserInputError(
            f"evaluation: attention_mask {tuple(mask.shape)} does not fit input_ids "
            f"{tuple(ids.shape)}"
        )
    return ids, mask if isinstance(mask, torch.Tensor) else None


def _split_labels(batch: Any, where: str | int) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, dict) and isinstance(where, str) and where in batch:
        return {k: v for k, v in batch.items() if k != where}, batch[where]
    if isinstance(batch, (tuple, list)) and isinstance(where, int) and -len(batch) <= where:
        items = list(batch)
        label = items.pop(where)
        return (items[0] if len(items) == 1 else tuple(items)), label
    return batch, None


def read_data(
    model: nn.Module,
    data: Any,
    *,
    metric: str = "auto",
    samples: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    labels: str | int = "labels",
    seed: int = 0,
    registry: Registry | None = None,
) -> EvalData:
    """Read ``data`` once for ``model``: a spec ``data`` dict (``{"source": ...}``, read
    by the registered source with ``model``'s tokenizer), or a tensor, tuple or dict of
    tensors (examples along dim 0). ``metric`` ``"auto"`` is resolved here: perplexity
    for a causal LM, accuracy when the batches hold ``labels``, cosine otherwise.

    Raises:
        UserInputError: unreadable or empty data, data that does not fit the metric.
    """
    registry = registry or get_registry()
    if metric == "auto" and is_causal_lm(model):
        metric = "perplexity"
    text = False
    if isinstance(data, dict) and "source" in data:
        text = _source_is_text(data, registry)
        if text and not data.get("tokenizer"):
            _check_has_tokenizer(model)
        if text and metric == "perplexity" and "max_length" not in data:
            data = {**data, "max_length": TEXT_MAX_LENGTH}  # (the lines are not cut)
        got = data_batches(data, model, batch_size, samples, seed, registry=registry)
    elif isinstance(data, (torch.Tensor, tuple, dict)):
        got = split(data, batch_size)
    else:
        raise UserInputError(f"evaluation: cannot read data of type {type(data).__name__}")
    out = EvalData(metric, keyword=False, stream=text)
    for batch in got:
        out.keyword = isinstance(batch, dict) and hasattr(model, "config")  # (else the ids)
        if out.metric == "perplexity":
            out.sequences.extend(_sequences(model, batch, text))
            continue
        inputs, label = _split_labels(batch, labels)
        if out.metric == "auto":
            out.metric = "accuracy" if label is not None else "cosine"
        if out.metric == "accuracy" and label is None:
            raise UserInputError(
                f"evaluation: accuracy needs labels, and a batch holds none at {labels!r} "
                "(a key of dict batches, or an index of tuple batches)"
            )
        out.batches.append(inputs)
        if label is not None:
            out.labels.append(label)
    if out.metric == "perplexity":
        out.sequences = _cut(_joined(model, out.sequences) if text else out.sequences, max_tokens)
        if sum(max(len(s) - 1, 0) for s in out.sequences) == 0:
            why = " (did the tokenizer give any token?)" if text else ""
            raise UserInputError(f"evaluation: the data holds no token to predict{why}")
    elif not out.batches:
        raise UserInputError("evaluation: the data holds no example")
    return out


def _sequences(model: nn.Module, batch: Any, text: bool) -> list[torch.Tensor]:
    """Each row's real tokens: without the positions masked out (and, outside text
    sources, the config's pad id)."""
    ids, mask = _ids_of(batch)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    pad = _config_id(model, "pad_token_id")
    if not text and pad is not None:
        keep &= ids != pad
    return [row[k].cpu() for row, k in zip(ids, keep, strict=True)]


def _joined(model: nn.Module, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """A text source's rows as one stream: with a BOS before every line, the first kept."""
    rows = [r for r in rows if len(r)]
    bos = _config_id(model, "bos_token_id")
    if bos is not None and rows and all(int(r[0]) == bos for r in rows):
        rows = [rows[0], *(r[1:] for r in rows[1:])]
    return [torch.cat(rows)] if rows else []


def _cut(sequences: list[torch.Tensor], max_tokens: int | None) -> list[torch.Tensor]:
    if max_tokens is None:
        return sequences
    out, left = [], max_tokens
    for s in sequences:
        if left <= 0:
            break
        out.append(s[:left])
        left -= len(out[-1])
    return out


# ------------------------------------------------------------ comparability


def model_directory(model: nn.Module) -> Path | None:
    """The directory a Hugging Face ``model`` was loaded from (``None`` if none)."""
    config = getattr(model, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return Path(where) if where and Path(where).is_dir() else None


PROBE = {"source": "sentences", "samples": 64}
"""What two tokenizers are compared on: built-in sentences, through the data source."""


def _probe(directory: Path, registry: Registry) -> list[torch.Tensor] | None:
    """The built-in sentences' token ids through the tokenizer in ``directory``;
    ``None`` when it holds none (nothing to compare)."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        got = data_batches({**PROBE, "tokenizer": str(directory)}, None, 64, registry=registry)
        return [b["input_ids"] for b in got]
    except UserInputError:
        return None


def check_comparable(
    model: nn.Module, baseline: nn.Module, registry: Registry | None = None
) -> None:
    """Refuse to compare two models that do not read the same token ids alike: their
    input embeddings have different numbers of rows, or their directories' tokenizers
    give different ids for the same sentences.

    Raises:
        UserInputError: naming both vocabularies or both directories.
    """
    registry = registry or get_registry()
    a, b = vocab_size(model), vocab_size(baseline)
    if a is not None and b is not None and a != b:
        raise UserInputError(
            f"evaluation: the model and the baseline have different vocabularies ({a:,} and "
            f"{b:,} tokens): the same token ids mean different things to them"
        )
    da, db = model_directory(model), model_directory(baseline)
    if da is None or db is None or da.resolve() == db.resolve():
        return
    if "sentences" not in registry.data_sources:
        return
    ids_a, ids_b = _probe(da, registry), _probe(db, registry)
    if ids_a is None or ids_b is None:
        return
    same = len(ids_a) == len(ids_b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ids_a, ids_b, strict=True)
    )
    if not same:
        raise UserInputError(
            f"evaluation: the model and the baseline have different tokenizers ({da} and "
            f"{db} give different token ids for the same sentences): they cannot be "
            "compared on the same data"
        )
