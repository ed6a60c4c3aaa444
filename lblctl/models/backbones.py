"""Face backbones behind a small registry (in the spirit of timm's ``create_model``).

Every backbone maps a 3×S×S image in [−1, 1] to an embedding of ``embedding_size`` (not yet
normalised; heads and embedders normalise). Register new ones with :func:`register_backbone`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lblctl.core.errors import LblError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUT: dict[str, int] = {}


def register_backbone(name: str, default_input_size: int = 112):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        _DEFAULT_INPUT[name] = default_input_size
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def default_input_size(name: str) -> int:
    return _DEFAULT_INPUT.get(name, 112)


def create_backbone(name: str, embedding_size: int = 512, input_size: int | None = None,
                    **kwargs: Any) -> nn.Module:
    """Build backbone ``name``; unknown names and impossible sizes are a :class:`LblError`."""
    if name == "onnx" and name not in _REGISTRY:  # converted ONNX models: registered on first use
        import lblctl.models.onnx_torch  # noqa: F401
    if name not in _REGISTRY:
        raise LblError(f"--arch {name}: unknown backbone; choose one of {', '.join(list_backbones())}")
    if embedding_size < 1:
        raise LblError(f"--embedding-size {embedding_size}: must be positive")
    size = input_size or default_input_size(name)
    return _REGISTRY[name](embedding_size=embedding_size, input_size=size, **kwargs)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """The seed's conv32-32-pool-64-64-pool-512-GAP family, with a BN'd linear embedding.

    Small enough to train on a 2-core CPU in minutes at 32–64 px.
    """

    def __init__(self, embedding_size: int = 512, input_size: int = 64, width: int = 32) -> None:
        super().__init__()
        if input_size < 16:
            raise LblError(f"--input-size {input_size}: small_cnn needs at least 16 px")
        w = width
        self.features = nn.Sequential(
            *_conv_bn(3, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.MaxPool2d(2) if input_size >= 48 else nn.Identity(),
            *_conv_bn(2 * w, 16 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embedding = nn.Sequential(nn.Linear(16 * w, embedding_size, bias=False),
                                       nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(x))


@register_backbone("small_cnn", default_input_size=64)
def small_cnn(embedding_size: int = 512, input_size: int = 64, width: int = 32) -> nn.Module:
    return SmallCNN(embedding_size, input_size, width)


# ----------------------------------------------------------------------------- iresnet
# The layout of insightface's arcface_torch iresnet: BN-conv-BN-PReLU-conv-BN blocks, and an
# embedding head BN → Dropout → FC → BN (the last BN with a fixed scale of 1).


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers: list[int], embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.0, width: int = 64) -> None:
        super().__init__()
        if input_size % 16:
            raise LblError(f"--input-size {input_size}: iresnet needs a multiple of 16 (112 is standard)")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, layers[0], stride=2)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(8 * width, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        spatial = input_size // 16
        self.fc = nn.Linear(8 * width * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


@register_backbone("iresnet18", default_input_size=112)
def iresnet18(embedding_size: int = 512, input_size: int = 112, **kw: Any) -> nn.Module:
    return IResNet([2, 2, 2, 2], embedding_size, input_size, **kw)


@register_backbone("iresnet34", default_input_size=112)
def iresnet34(embedding_size: int = 512, input_size: int = 112, **kw: Any) -> nn.Module:
    return IResNet([3, 4, 6, 3], embedding_size, input_size, **kw)


@register_backbone("iresnet50", default_input_size=112)
def iresnet50(embedding_size: int = 512, input_size: int = 112, **kw: Any) -> nn.Module:
    return IResNet([3, 4, 14, 3], embedding_size, input_size, **kw)


@register_backbone("iresnet100", default_input_size=112)
def iresnet100(embedding_size: int = 512, input_size: int = 112, **kw: Any) -> nn.Module:
    return IResNet([3, 13, 30, 3], embedding_size, input_size, **kw)


# ----------------------------------------------------------------------------- MobileFaceNet
# Chen et al. 2018 in arcface_torch's layout: depthwise-separable bottlenecks (PReLU), a 1×1 conv
# to 512 channels, then the global depthwise conv (GDC) head: a 7×7 depthwise linear conv
# instead of global pooling (face pixels are not equally important), a linear FC and BN.


def _conv_bn_prelu(cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.PReLU(cout))


def _linear_conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class DepthWise(nn.Module):
    """Bottleneck: 1×1 expand (PReLU) → 3×3 depthwise (PReLU) → 1×1 linear project [+ residual]."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _conv_bn_prelu(cin, hidden),
            _conv_bn_prelu(hidden, hidden, 3, stride, 1, groups=hidden),
            _linear_conv(hidden, cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class GDC(nn.Module):
    """Global depthwise conv head: depthwise k×k linear conv → flatten → FC (no bias) → BN."""

    def __init__(self, channels: int, kernel: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _linear_conv(channels, channels, kernel, groups=channels), nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False), nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (≈1.0M parameters at 128-d, ≈1.2M at 512-d with ``scale=1``).

    ``scale=2`` doubles the widths as arcface_torch's ``mbf`` does.
    """

    def __init__(self, embedding_size: int = 512, input_size: int = 112,
                 blocks: tuple[int, ...] = (1, 4, 6, 2), scale: int = 1) -> None:
        super().__init__()
        if input_size % 16 or input_size < 32:
            raise LblError(f"--input-size {input_size}: mobilefacenet needs a multiple of 16 ≥ 32 "
                           "(112 is standard)")
        c1, c2 = 64 * scale, 128 * scale
        layers: list[nn.Module] = [_conv_bn_prelu(3, c1, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(_conv_bn_prelu(c1, c1, 3, 1, 1, groups=64))
        else:
            layers += [DepthWise(c1, c1, 128, residual=True) for _ in range(blocks[0])]
        layers.append(DepthWise(c1, c1, 128, stride=2))
        layers += [DepthWise(c1, c1, 128, residual=True) for _ in range(blocks[1])]
        layers.append(DepthWise(c1, c2, 256, stride=2))
        layers += [DepthWise(c2, c2, 256, residual=True) for _ in range(blocks[2])]
        layers.append(DepthWise(c2, c2, 512, stride=2))
        layers += [DepthWise(c2, c2, 256, residual=True) for _ in range(blocks[3])]
        layers.append(_conv_bn_prelu(c2, 512))
        self.body = nn.Sequential(*layers)
        self.features = GDC(512, input_size // 16, embedding_size)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.body(x))


@register_backbone("mobilefacenet", default_input_size=112)
def mobilefacenet(embedding_size: int = 512, input_size: int = 112, **kw: Any) -> nn.Module:
    return MobileFaceNet(embedding_size, input_size, **kw)


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or frozen), the figure papers quote."""
    return sum(p.numel() for p in model.parameters())
