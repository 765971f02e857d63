"""Text to token batches for the built-in text sources (``text``, ``docstrings``): the
tokenizer of the Hugging Face model being surgered (or a directory the spec names),
loaded offline with no remote code from a directory checked first, and batches padded
to their longest line."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tnsurgery.datasource import DataContext
from tnsurgery.errors import UserInputError
from tnsurgery.io.files import HF_WEIGHT_SUFFIXES
from tnsurgery.io.outputs import link_stays_inside

MAX_TOKENIZER_FILE_BYTES = 1 << 30
"""Largest file of a tokenizer directory (1 GiB; weights aside)."""
CHARS_PER_TOKEN = 32
"""Characters of a line kept per token of ``max_length`` (tokens are a few characters
long): a line of a gigabyte is not tokenized whole to keep its first tokens."""


def check_tokenizer_dir(where: Path) -> None:
    """A tokenizer directory holds regular files (each at most
    :data:`MAX_TOKENIZER_FILE_BYTES`, weights aside) and directories, and no link out
    of it (``/proc/self/pagemap`` is a "regular file" of size 0): no FIFO, device or
    endless file for the tokenizer to read. A name that is no path is left to the local
    Hugging Face cache."""
    try:
        if not where.exists():
            return
        if not where.is_dir():
            raise UserInputError(f"data: the tokenizer {where} is not a directory")
        entries = list(where.iterdir())
    except OSError as exc:
        raise UserInputError(f"data: cannot read the tokenizer directory {where}: {exc}") from None
    for entry in entries:
        if entry.is_symlink() and not link_stays_inside(entry, where):
            raise UserInputError(
                f"data: the tokenizer directory {where} holds {entry.name}, a link out of "
                "the directory: refused (copy the file in)"
            )
        try:
            st = entry.stat()
        except OSError:  # a broken link: nothing to read
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
            raise UserInputError(
                f"data: the tokenizer directory {where} holds {entry.name}, not a regular "
                f"file but a {kind}"
            )
        if st.st_size > MAX_TOKENIZER_FILE_BYTES and entry.suffix not in HF_WEIGHT_SUFFIXES:
            raise UserInputError(
                f"data: the tokenizer directory {where} holds {entry.name} of "
                f"{st.st_size:,} bytes, more than the limit of {MAX_TOKENIZER_FILE_BYTES:,}"
            )


def model_directory(model: nn.Module | None) -> str | None:
    """The directory a Hugging Face ``model`` was loaded from (``None`` if none)."""
    config = getattr(model, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return where if where and Path(where).is_dir() else None


def load_tokenizer(where: str | None, ctx: DataContext, source: str) -> Any:
    """The tokenizer in ``where`` (default: the model's own directory), ready to pad
    batches of ``ctx.batch_size`` (a model without a pad token pads with its
    end-of-sequence or unknown token, masked out anyway)."""
    where = where or model_directory(ctx.model)
    if where is None:
        raise UserInputError(
            f"data: source '{source}' needs a tokenizer: give \"tokenizer\" (a directory), or "
            "a Hugging Face model loaded from a directory"
        )
    check_tokenizer_dir(Path(where))
    try:
        import transformers  # optional dependency (the hf extra)

        tok = transformers.AutoTokenizer.from_pretrained(
            where, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise UserInputError(f"data: cannot load a tokenizer from {where}: {exc}") from None
    if tok.pad_token is None:  # e.g. GPT-2: pad with its end-of-text (masked out anyway)
        fill = tok.eos_token or tok.unk_token
        if fill is not None:
            tok.pad_token = fill
        elif ctx.batch_size > 1:
            raise UserInputError(
                f"data: the tokenizer in {where} has no pad, end-of-sequence or unknown token "
                "to pad batches with: set its pad_token, or use batch_size 1"
            )
    return tok


def tokenized(
    tok: Any, lines: list[str], max_length: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``lines`` tokenized ``batch_size`` at a time, each batch padded to its longest
    line and truncated to ``max_length`` tokens (each line first cut to
    :data:`CHARS_PER_TOKEN` characters a token)."""
    padding = tok.pad_token is not None  # batch_size 1 needs none
    longest = max_length * CHARS_PER_TOKEN  # (a line is cut before it is tokenized whole)
    for start in range(0, len(lines), batch_size):
        enc = tok(
            [line[:longest] for line in lines[start : start + batch_size]],
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


class TokenizedParams(BaseModel):
    """The params every built-in text source shares: how its lines become tokens."""

    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(128, ge=1, description="Truncate each example to this many tokens.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer directory; default: the Hugging Face model's own directory.",
    )
    shuffle: bool = Field(
        False,
        description="Shuffle the examples (with the run's seed; in training, a new order each "
        "epoch, replayed exactly on resume).",
    )


def text_source_batches(
    lines: list[str], params: TokenizedParams, ctx: DataContext, source: str
) -> Iterator[dict[str, torch.Tensor]]:
    """``lines`` through the tokenizer ``params`` names (or the model's), shuffled with
    the run's seed when ``params.shuffle``, ``ctx.batch_size`` at a time."""
    tok = load_tokenizer(params.tokenizer, ctx, source)
    if params.shuffle:
        order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(ctx.seed))
        lines = [lines[i] for i in order.tolist()]
    yield from tokenized(tok, lines, params.max_length, ctx.batch_size)
