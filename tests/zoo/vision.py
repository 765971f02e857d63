"""Tiny vision models in plain torch, with the module structure of torchvision's.

torchvision cannot be imported next to the development torch (its CPU/CUDA
builds do not match: ``operator torchvision::nms does not exist``), so the
default suite rebuilds the shapes users bring, module for module, with the
attribute names torchvision uses (``layer1.0.conv1``, ``features.3.block.2.fc1``,
``encoder.layers.encoder_layer_0.self_attention``...) and the same ways of
calling them: torchvision's ViT runs ``nn.MultiheadAttention`` (which reads
``out_proj.weight`` itself, never calling ``out_proj``) and its Swin calls
``F.linear(x, self.qkv.weight, ...)`` on its ``qkv`` and ``proj`` Linears.

Every class is importable by its qualified name (``tests.zoo.vision.ResNet``),
so a pickled model loads with ``--allow-class tests.zoo.vision``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
IMAGE = (2, 3, 32, 32)


def image_input(seed: int = 1, shape: tuple[int, ...] = IMAGE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv (no bias), BatchNorm, activation."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, activation=nn.ReLU):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


# ------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet: stem, layer1..layer2 of blocks, avgpool, fc."""

    def __init__(self, block=BasicBlock, planes=(16, 32), num_classes=NUM_CLASSES):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, planes[0], 1)
        self.layer2 = self._make_layer(block, planes[1], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_basic() -> ResNet:
    return ResNet(BasicBlock, (16, 32))


def resnet_bottleneck() -> ResNet:
    return ResNet(Bottleneck, (8, 16))


# -------------------------------------------------------------- MobileNet v2 / v3


class InvertedResidualV2(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (groups=C), 1x1 linear projection."""

    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(cin, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 16, 3, 2, activation=nn.ReLU6),
            InvertedResidualV2(16, 16, 1, 1),
            InvertedResidualV2(16, 24, 2, 4),
            InvertedResidualV2(24, 24, 1, 4),
            ConvNormActivation(24, 64, 1, activation=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, 1x1 conv fc1, activation, 1x1 conv fc2,
    scale activation, times the input."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3's block: expand, depthwise, squeeze-excitation (hardsigmoid), project."""

    def __init__(self, cin, hidden, cout, kernel, stride, use_se, activation):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if hidden != cin:
            layers.append(ConvNormActivation(cin, hidden, 1, activation=activation))
        layers.append(
            ConvNormActivation(hidden, hidden, kernel, stride, groups=hidden, activation=activation)
        )
        if use_se:
            squeeze = max(8, hidden // 4)
            layers.append(SqueezeExcitation(hidden, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(hidden, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 16, 3, 2, activation=nn.Hardswish),
            InvertedResidualV3(16, 16, 16, 3, 2, True, nn.ReLU),
            InvertedResidualV3(16, 64, 24, 3, 2, False, nn.ReLU),
            InvertedResidualV3(24, 96, 24, 5, 1, True, nn.Hardswish),
            ConvNormActivation(24, 96, 1, activation=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2),
            nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------ EfficientNet


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth, row mode: the identity at eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand (SiLU), depthwise, squeeze-excitation, project."""

    def __init__(self, cin, cout, expand_ratio, kernel, stride, sd_prob=0.1):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand_ratio
        layers = []
        if hidden != cin:
            layers.append(ConvNormActivation(cin, hidden, 1, activation=nn.SiLU))
        layers += [
            ConvNormActivation(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU),
            ConvNormActivation(hidden, cout, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 16, 3, 2, activation=nn.SiLU),
            nn.Sequential(MBConv(16, 16, 1, 3, 1)),
            nn.Sequential(MBConv(16, 24, 4, 3, 2), MBConv(24, 24, 4, 3, 1)),
            ConvNormActivation(24, 64, 1, activation=nn.SiLU),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, LayerNorm, Linear 4C, GELU, Linear C, layer scale."""

    def __init__(self, dim, layer_scale=1e-6 * 1e5, sd_prob=0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32), num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)),
            nn.Sequential(CNBlock(dims[0])),
            nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2)),
            nn.Sequential(CNBlock(dims[1])),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[1], num_classes)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------- ViT (torchvision)


class MLPBlock(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )  # fmt: skip


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, nn.MultiheadAttention, LayerNorm, MLP."""

    def __init__(self, heads, dim, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length, layers, heads, dim, hidden):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential()
        for i in range(layers):
            self.layers.add_module(f"encoder_layer_{i}", EncoderBlock(heads, dim, hidden))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision.models.VisionTransformer: conv_proj patches, class token, encoder, heads."""

    def __init__(self, image=32, patch=8, layers=2, heads=2, dim=32, hidden=64,
                 num_classes=NUM_CLASSES):  # fmt: skip
        super().__init__()
        self.patch_size, self.hidden_dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (image // patch) ** 2 + 1
        self.encoder = Encoder(seq, layers, heads, dim, hidden)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


# -------------------------------------------------------------------------- Swin


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1).flatten()


def shifted_window_attention(x, qkv_weight, proj_weight, bias_table, index, window, shift,
                             heads, qkv_bias, proj_bias):  # fmt: skip
    """torchvision's functional shifted-window attention: the Linears' weights are read
    (``F.linear``), their modules never called."""
    b, h, w, c = x.shape
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    nh, nw = h // window, w // window
    x = x.view(b, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * nh * nw, window * window, c)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    n = window * window
    bias = bias_table[index].view(n, n, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if shift:
        mask = x.new_zeros((h, w))
        slices = ((0, -window), (-window, -shift), (-shift, None))
        count = 0
        for hs in slices:
            for ws in slices:
                mask[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        mask = mask.view(nh, window, nw, window).permute(0, 2, 1, 3).reshape(nh * nw, n)
        mask = (mask.unsqueeze(1) - mask.unsqueeze(2)) != 0
        mask = mask.float().masked_fill(mask, -100.0)
        attn = attn.view(b, nh * nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.size(0), n, c)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(b, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x


class ShiftedWindowAttention(nn.Module):
    """torchvision's: a Linear qkv and proj, a relative position bias table."""

    def __init__(self, dim, window, shift, heads):
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = window, shift, heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, heads).normal_(std=0.02)
        )
        self.register_buffer("relative_position_index", _relative_position_index(window))

    def forward(self, x):
        return shifted_window_attention(
            x, self.qkv.weight, self.proj.weight, self.relative_position_bias_table,
            self.relative_position_index, self.window_size, self.shift_size, self.num_heads,
            self.qkv.bias, self.proj.bias,
        )  # fmt: skip


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.stochastic_depth = StochasticDepth(0.0)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLPBlock(dim, 4 * dim)

    def forward(self, x):
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        x0, x1 = x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :]
        x2, x3 = x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class SwinTransformer(nn.Module):
    """torchvision.models.SwinTransformer: patch embedding (conv 4x4, permute, LayerNorm),
    blocks of (shifted) window attention, patch merging, norm, avgpool, head."""

    def __init__(self, dim=16, heads=(2, 4), window=4, num_classes=NUM_CLASSES):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dim, 4, 4), Permute([0, 2, 3, 1]), nn.LayerNorm(dim))]
        layers.append(
            nn.Sequential(
                SwinTransformerBlock(dim, heads[0], window, 0),
                SwinTransformerBlock(dim, heads[0], window, window // 2),
            )
        )
        layers.append(PatchMerging(dim))
        layers.append(nn.Sequential(SwinTransformerBlock(2 * dim, heads[1], window, 0)))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(2 * dim)
        self.permute = Permute([0, 3, 1, 2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x):
        x = self.permute(self.norm(self.features(x)))
        return self.head(self.flatten(self.avgpool(x)))
