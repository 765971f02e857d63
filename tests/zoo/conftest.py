"""The zoo's shared fixture: every family built once and every cell run once per module."""

from __future__ import annotations

import pytest

from tests.zoo.runner import Zoo


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def needs(family) -> None:
    """Skip a Hugging Face family where transformers is not installed."""
    if family.hf:
        pytest.importorskip("transformers")
