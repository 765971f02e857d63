"""The real torchvision models, for ``python -m tests.zoo.report --torchvision`` only.

Not imported by the test suite: torchvision does not import beside the development
torch (2.13.0 CPU; PyPI's torchvision wheels are built against another torch). Run in
a separate venv with a matching pair, e.g. ``torch==2.14.1 torchvision==0.29.1``.
Random weights, ``num_classes=10``.
"""

from __future__ import annotations

import torch

from .families import Family

SMALL = (1, 3, 64, 64)  # the convnets take any size
VIT = (1, 3, 224, 224)  # vit_b_16 is built for 224x224; swin_t runs at it too
INPUTS = "1x3x64x64 (convnets), 1x3x224x224 (vit_b_16, swin_t)"
# CP-ALS at param_ratio 0.25 runs for minutes per 512-channel conv on a shared CPU:
# the real models take a fixed small CP rank (the other transforms: the zoo's params)
PARAMS = {"cp": {"rank": 8}}


def _builder(name: str):
    def build():
        import torchvision  # the separate venv only

        return getattr(torchvision.models, name)(weights=None, num_classes=10)

    return build


def _input(shape):
    def make(seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    return make


def _tv(name: str, shape) -> Family:
    return Family(name, f"torchvision.models.{name}", "torchvision", _builder(name), _input(shape))


TORCHVISION = [
    _tv("resnet18", SMALL),
    _tv("mobilenet_v3_small", SMALL),
    _tv("efficientnet_b0", SMALL),
    _tv("convnext_tiny", SMALL),
    _tv("vit_b_16", VIT),
    _tv("swin_t", VIT),
]
