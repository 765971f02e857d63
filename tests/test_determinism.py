"""The same spec and seed give the same model, bit for bit, and the same manifest but for
its timestamps and timings, whatever the global RNG state of the caller."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from tnsurgery import surgery

# the manifest keys that hold a time: when it was made, and how long a step took
TIMES = {"created", "seconds"}


def without_times(value: Any) -> Any:
    """``value`` (a manifest's JSON data) without the keys in :data:`TIMES`, at any depth."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def times_in(value: Any) -> set[str]:
    """The keys of :data:`TIMES` found in ``value``, at any depth."""
    if isinstance(value, dict):
        found = {k for k in value if k in TIMES}
        return found.union(*(times_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(times_in(v) for v in value))
    return set()


def mlp() -> nn.Sequential:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def random_data(samples: int) -> dict[str, Any]:
    return {"source": "random", "shape": [16], "samples": samples}


SPECS = {
    "factorize with sequential calibration": {
        "rules": [{"match": "[024]", "transform": "factorize", "params": {"param_ratio": 0.4}}],
        "calibration": {"data": random_data(96), "batch_size": 16, "sequential": True},
    },
    "randomized factorize on a budget": {
        "rules": [
            {
                "match": "[02]",
                "transform": "factorize",
                "params": {"method": "randomized", "seed": 3},
            }
        ],
        "budget": {"params": 0.5},
    },
    "tt": {
        "rules": [
            {
                "match": "2",
                "transform": "tt",
                "params": {"ranks": 6, "in_factors": [8, 8], "out_factors": [8, 8]},
            }
        ]
    },
    "distillation": {
        "rules": [{"match": "[02]", "transform": "factorize", "params": {"rank": 6}}],
        "training": {
            "data": random_data(64),
            "steps": 6,
            "batch_size": 16,
            "lr": 1e-2,
            "seed": 5,
            "dropout": True,
            "eval_every": 3,
            "eval_data": random_data(32),
        },
    },
}


def run(spec: dict, global_seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Surgery of a fresh model, the caller's RNGs in another state each time."""
    torch.manual_seed(global_seed)
    random.seed(global_seed)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    model = surgery.apply(mlp(), spec, x)
    return model.state_dict(), surgery.get_manifest(model)


@pytest.mark.parametrize("name", list(SPECS))
def test_same_spec_and_seed_give_bit_identical_weights_and_manifest(name):
    spec = SPECS[name]
    first_state, first_manifest = run(spec, global_seed=1)
    second_state, second_manifest = run(spec, global_seed=2)
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert value.dtype == second_state[key].dtype
        assert torch.equal(value, second_state[key]), key
    assert "created" in times_in(first_manifest)
    assert without_times(first_manifest) == without_times(second_manifest)


def test_the_manifests_differ_only_in_what_is_stripped():
    """The stripped keys are timestamps and timings: everything else is compared."""
    _, manifest = run(SPECS["distillation"], global_seed=0)
    assert times_in(manifest) == {"created", "seconds"}
    assert "training" in manifest and "seconds" not in without_times(manifest)["training"]
