"""Shared test helpers: seeded weights with a known spectrum, small models, a fixed registry.

The helpers are plain functions (importable as ``from conftest import trained_like``)
and also fixtures of the same name, for tests that prefer injection.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnsurgery.plugins import Registry
from tnsurgery.transforms import factorize

# The tests use small matrices, where intra-op threads only cost: on a busy 2-core
# machine, OpenMP contention made a 40x96 SVD take 0.5 s instead of 1 ms.
torch.set_num_threads(1)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def weight_with_spectrum(
    out_features: int,
    in_features: int,
    singular_values: torch.Tensor,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthonormal ``U``, ``V``: its singular values are exactly
    ``singular_values`` (zero-padded to ``min(out, in)``)."""
    k = min(out_features, in_features)
    s = torch.zeros(k, dtype=torch.float64)
    given = torch.as_tensor(singular_values, dtype=torch.float64)[:k]
    s[: len(given)] = given
    gen = torch.Generator().manual_seed(seed)
    u = _orthonormal(out_features, k, gen)
    v = _orthonormal(in_features, k, gen)
    return ((u * s) @ v.T).to(dtype)


def trained_like(
    out_features: int,
    in_features: int,
    seed: int = 0,
    decay: float = 0.9,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A weight whose spectrum decays geometrically (``s_i = decay**i``), like a trained
    layer's: the leading values dominate but no rank reconstructs it exactly."""
    k = min(out_features, in_features)
    s = decay ** torch.arange(k, dtype=torch.float64)
    return weight_with_spectrum(out_features, in_features, s, seed=seed, dtype=dtype)


def known_rank(
    out_features: int,
    in_features: int,
    rank: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A weight of exact rank ``rank`` (singular values ``rank, rank-1, ..., 1``, then zeros)."""
    s = torch.arange(rank, 0, -1, dtype=torch.float64)
    return weight_with_spectrum(out_features, in_features, s, seed=seed, dtype=dtype)


def linear_with_weight(weight: torch.Tensor, bias: bool = True, seed: int = 0) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and a seeded random bias)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            gen = torch.Generator().manual_seed(seed + 1000)
            layer.bias.copy_(torch.randn(out_features, generator=gen, dtype=torch.float64))
    return layer


def small_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``Linear(48→64) → ReLU → Linear(64→40)`` with trained-like weights."""
    model = nn.Sequential(
        linear_with_weight(trained_like(64, 48, seed=seed, dtype=dtype), seed=seed),
        nn.ReLU(),
        linear_with_weight(trained_like(40, 64, seed=seed + 1, dtype=dtype), seed=seed + 1),
    )
    return model.eval()


def factorize_only_registry() -> Registry:
    """A registry holding only the built-in ``factorize`` (independent of installed plugins,
    so that messages listing the valid names are stable)."""
    found = []
    factorize.register_transforms(register=found.append)
    return Registry(
        transforms={t.name: t for t in found}, origins={t.name: "builtin" for t in found}
    )


def tiny_bert_model(seed: int = 0) -> nn.Module:
    """A randomly initialised Hugging Face BERT small enough for unit tests."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def encoder_factorize(param_ratio: float) -> dict:
    """A rule factorizing every encoder Linear of a BERT at ``param_ratio``."""
    return {
        "match": "encoder.layer.*.**",
        "types": ["Linear"],
        "transform": "factorize",
        "params": {"param_ratio": param_ratio},
    }


@pytest.fixture(name="trained_like")
def trained_like_fixture():
    return trained_like


@pytest.fixture(name="known_rank")
def known_rank_fixture():
    return known_rank


@pytest.fixture(name="small_mlp")
def small_mlp_fixture() -> nn.Sequential:
    return small_mlp()


@pytest.fixture(name="factorize_registry")
def factorize_registry_fixture() -> Registry:
    return factorize_only_registry()


@pytest.fixture(name="tiny_bert", scope="session")
def tiny_bert_fixture() -> nn.Module:
    """Shared, read-only: tests that modify it must deep-copy it first."""
    return tiny_bert_model()
