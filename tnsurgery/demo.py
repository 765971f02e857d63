"""The built-in example behind ``tnsurgery demo``: a small MLP with trained-like weights.

Trained weight matrices have decaying singular values (a few strong
directions, a long tail); random init does not. :func:`demo_model` builds
its weights with a power-law spectrum, deterministically, so the demo shows
what factorization does to a trained model without shipping a weight file.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn


class DemoMLP(nn.Module):
    """512 -> 2048 -> 2048 -> 256 MLP with GELU, as in a transformer block's feed-forward."""

    def __init__(self, dims: tuple[int, ...] = (512, 2048, 2048, 256)):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.fc2 = nn.Linear(dims[1], dims[2])
        self.head = nn.Linear(dims[2], dims[3])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def trained_like_(linear: nn.Linear, generator: torch.Generator, decay: float = 1.0) -> None:
    """Overwrite ``linear.weight`` with random singular vectors and a power-law spectrum."""
    out_f, in_f = linear.weight.shape
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=generator))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)
    s = s / s.norm() * (out_f**0.5)  # about unit-variance outputs for unit-variance inputs
    with torch.no_grad():
        linear.weight.copy_((u * s) @ v.T)
        linear.bias.copy_(0.01 * torch.randn(out_f, generator=generator))


def demo_model(seed: int = 0) -> DemoMLP:
    """The demo model, identical for a given seed."""
    g = torch.Generator().manual_seed(seed)
    model = DemoMLP()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trained_like_(m, g)
    return model.eval()


def demo_spec() -> dict:
    """The spec shipped with the demo (``tnsurgery/data/demo_spec.json``)."""
    text = resources.files("tnsurgery").joinpath("data/demo_spec.json").read_text("utf-8")
    return json.loads(text)


def demo_input(batch: int = 256, seed: int = 1) -> torch.Tensor:
    """A sample input batch for the demo model."""
    return torch.randn(batch, 512, generator=torch.Generator().manual_seed(seed))
