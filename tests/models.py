"""Small models for the tests, importable by name (``--arch tests.models:mlp``).

Every factory is deterministic: it seeds its own generator, so two calls give
the same weights, and a subprocess building ``tests.models:mlp`` gets the
same model as the test that wrote the file. Weights have a decaying spectrum
(like a trained layer's) so that factorization errors are small but not zero.
"""

from __future__ import annotations

import torch
from torch import nn

from tnsurgery.demo import trained_like_


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            trained_like_(m, gen, decay=1.5)
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.2)
                if m.bias is not None:
                    m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


class MLP(nn.Module):
    """16 -> 48 -> 48 -> 8, ReLU; fx-traceable."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(48, 48)
        self.fc3 = nn.Linear(48, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class CNN(nn.Module):
    """3x16x16 images -> 10 classes; fx-traceable."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Branchy(MLP):
    """The MLP with data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if h.sum() > 0:
            h = self.act(self.fc2(h))
        return self.fc3(h)


class Twice(nn.Module):
    """``fc`` is applied twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.fc(h))
        h = torch.relu(self.fc(h))
        return self.out(h)


class Tied(nn.Module):
    """``enc`` and ``dec`` hold the same weight Parameter (tied weights)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(32, 32)
        self.dec = nn.Linear(32, 32)
        self.dec.weight = self.enc.weight
        self.other = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.dec(torch.relu(self.enc(x))))


class Aliased(nn.Module):
    """One Linear registered under two names (``first`` and ``second``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(32, 32)
        self.second = self.first
        self.last = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.first(x)))


def mlp() -> MLP:
    """The MLP with trained-like weights (same weights on every call)."""
    return _trained_like(MLP(), seed=0)


def cnn() -> CNN:
    """The CNN with seeded weights."""
    return _trained_like(CNN(), seed=1)


def branchy() -> Branchy:
    return _trained_like(Branchy(), seed=0)


def twice() -> Twice:
    return _trained_like(Twice(), seed=2)


def tied() -> Tied:
    return _trained_like(Tied(), seed=3)


def aliased() -> Aliased:
    return _trained_like(Aliased(), seed=4)


def plain_mlp() -> nn.Sequential:
    """The MLP's layers in an ``nn.Sequential`` (only torch.nn classes: safe to unpickle)."""
    m = mlp()
    return nn.Sequential(m.fc1, nn.ReLU(), m.fc2, nn.ReLU(), m.fc3).eval()


def broken() -> nn.Module:
    """A factory that fails, for ``--arch`` error handling."""
    raise RuntimeError("this factory is broken on purpose")


class TokenMLP(nn.Module):
    """Token-wise (each position's output depends on its own token only): an
    embedding, then two Linears; takes Hugging Face-style keyword inputs."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # fixed weights, the caller's RNG untouched
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 16)
            self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
