"""Honest speed: each planned replacement timed against its original (placeholder)."""
