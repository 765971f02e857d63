"""Evaluation where the user looks: perplexity, cosine, accuracy (placeholder)."""
