"""Evaluation where the user looks: perplexity, cosine or accuracy of a model, side by
side with another (the original) on the same data.

The data is a spec ``data`` dict, read by the registered data sources exactly as a
calibration reads it (:func:`tnsurgery.data.batches`), or tensors given directly. It is
read once, with the model's tokenizer, and both models see the same tokens.

- **perplexity** (causal LMs): ``exp`` of the mean negative log-likelihood of every
  predicted token. A sequence longer than ``window`` is scored with a sliding window
  (as in the Hugging Face perplexity guide): each window moves by ``stride`` tokens
  (fewer than ``window``) and scores only the tokens no earlier window scored, each with
  up to ``window - 1`` tokens of context; every token but a sequence's first is scored
  exactly once. A Hugging Face model is called with ``input_ids=`` (no cache), any
  other module with the ids as its one argument, and returns the logits. A text
  source (one with a ``tokenizer`` param: ``text``, ``sentences``) is read as one token
  stream, its examples in order: the padding its batches carry (``attention_mask`` 0)
  is dropped and, when the tokenizer puts a BOS token (the model config's
  ``bos_token_id``) before every line, only the stream's first one is kept. Token ids
  from any other source (a ``tensors`` file holding ``input_ids``) are used as given,
  each row a sequence, without the positions whose ``attention_mask`` is 0 or whose id
  is the config's ``pad_token_id``.
- **cosine**: per example, the cosine of the two models' mean-pooled (over real
  tokens) last hidden states; the mean and the minimum over the examples.
- **accuracy**: the argmax of the logits against the batches' labels (positions
  labelled -100 are not counted).
"""

from tnsurgery.evaluation.reading import (
    EvalData,
    check_comparable,
    default_window,
    is_causal_lm,
    max_positions,
    model_directory,
    read_data,
    vocab_size,
)
from tnsurgery.evaluation.scoring import (
    EvalReference,
    EvalResult,
    evaluate,
    perplexity,
    reference_for,
    spec_reference,
    windows,
)

__all__ = [
    "EvalData",
    "EvalReference",
    "EvalResult",
    "check_comparable",
    "default_window",
    "evaluate",
    "is_causal_lm",
    "max_positions",
    "model_directory",
    "perplexity",
    "read_data",
    "reference_for",
    "spec_reference",
    "vocab_size",
    "windows",
]
