"""Backbones return (logits, [feature map of each stage]) so the TD module can read the stages."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def stage_outputs(stages: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Run x through the stages in turn; the output of each (the TD module reads them all)."""
    features = []
    for stage in stages:
        x = stage(x)
        features.append(x)
    return features


def penultimate(features: list[torch.Tensor]) -> torch.Tensor:
    """The head's input: the last stage, global-average-pooled, B×C_last (embedding strategies use it)."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(features[-1], 1), 1)


class SmallCNN(nn.Module):
    """Three conv stages for small images (8×8 digits up to 32×32): width, 2·width, 4·width.

    Stage 1 keeps the resolution; stages 2 and 3 halve it. Global average pooling makes the
    head independent of the input size. `dropout` > 0 puts a dropout layer before the head
    (0, the default, adds no layer: no parameters and no draws from the random stream).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.stages = nn.ModuleList([
            _conv_bn_relu(in_channels, width),
            nn.Sequential(_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2)),
            nn.Sequential(_conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2)),
        ])
        self.stage_channels = [width, 2 * width, 4 * width]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = stage_outputs(self.stages, x)
        logits = self.head(self.dropout(penultimate(features)))
        return logits, features


class CifarCNN(nn.Module):
    """A fast plain CNN for CPU training on 32×32 images: a stem, then three stages of two 3×3
    conv-BN-ReLU at widths w, 2w, 4w, with 2×2 max-pooling before every stage.

    The stem (one conv at full resolution, then the first pool) is the only layer at 32×32, so
    the stages run at 16, 8 and 4 pixels: about a third of SmallCNN's cost per image at three
    times its parameters (benchmarks/speed.py, `backbones`). Pooling first is what the fast
    CIFAR-10 trainers do too (airbench pools right after each block's first conv). Global
    average pooling keeps the head independent of the input size (8×8 digits end at 1×1).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width), nn.MaxPool2d(2))
        stages, c_in = [], width
        for i, c in enumerate(widths):
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            stages.append(nn.Sequential(*pool, _conv_bn_relu(c_in, c), _conv_bn_relu(c, c)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.stage_channels = widths
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = stage_outputs(self.stages, self.stem(x))
        logits = self.head(self.dropout(penultimate(features)))
        return logits, features


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (as in the TiDAL reference code): 3×3 stride-1 stem, no max-pool,
    BasicBlock ×[2,2,2,2] at widths 64/128/256/512 (stages 2-4 halve the resolution).

    The 4 stage outputs are the TD module's inputs. Global average pooling (the reference uses
    avg_pool2d(4), the same on 32×32 inputs) makes the head independent of the input size.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512),
                 blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if b == 0 else width, width, stride if b == 0 else 1)
                                          for b in range(n))))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.stage_channels = list(widths)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = stage_outputs(self.stages, self.stem(x))
        logits = self.head(penultimate(features))
        return logits, features


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": SmallCNN,
    "cifar-cnn": CifarCNN,
    "resnet18": ResNet18,
}


TIMM_PREFIX = "timm/"  # `timm/<architecture>`: any timm model (tidal.models.timm_backbone)


def build_backbone(name: str, in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A backbone by name: one of BACKBONES, or `timm/<architecture>` for any timm model."""
    if name.startswith(TIMM_PREFIX):
        from tidal.models.timm_backbone import TimmBackbone

        return TimmBackbone(name.removeprefix(TIMM_PREFIX), in_channels, num_classes, dropout=dropout)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(BACKBONES)} or timm/<architecture>")
    # Only SmallCNN and CifarCNN take `dropout`; 0 (the default) passes nothing, so any backbone builds with it.
    extra = {"dropout": dropout} if dropout > 0 else {}
    return BACKBONES[name](in_channels=in_channels, num_classes=num_classes, **extra)
