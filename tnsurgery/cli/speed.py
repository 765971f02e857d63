"""``tnsurgery bench``: each planned replacement timed against its original (placeholder)."""
