"""``tnsurgery eval``: perplexity, cosine or accuracy, side by side (placeholder)."""
