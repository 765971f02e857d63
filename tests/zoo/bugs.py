"""Known tnsurgery bugs the zoo finds: each is an ``xfail(strict=True)`` test (it turns
into a failure once fixed, to drop the marker) and a line in docs/models.md. Each
message says what fails today, exactly, and what is expected."""

from __future__ import annotations

API: dict[tuple[str, str], str] = {}
"""(family, transform) -> the bug its API cell shows. GPT-2 x tucker was listed here
(a refusal that did not name the Conv1D layers its rule left out) until the message
named them."""

CLI_DEFAULT_SAMPLE: dict[str, str] = {}
"""family -> the bug ``tnsurgery apply`` shows with no --sample-input (cli/samples.py,
cli/shapes.py). T5 was listed here (no decoder_input_ids) until the CLI's default
sample gave encoder-decoder models decoder inputs, and Whisper (random token ids where
it takes input features) until the default followed the model's main input."""
