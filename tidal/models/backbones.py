"""Backbones return (logits, [feature map of each stage]) so the TD module can read the stages."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages for small images (8×8 digits up to 32×32): width, 2·width, 4·width.

    Stage 1 keeps the resolution; stages 2 and 3 halve it. Global average pooling makes the
    head independent of the input size.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stages = nn.ModuleList([
            _conv_bn_relu(in_channels, width),
            nn.Sequential(_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2)),
            nn.Sequential(_conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2)),
        ])
        self.stage_channels = [width, 2 * width, 4 * width]
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        logits = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return logits, features


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": SmallCNN,
}


def build_backbone(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, num_classes=num_classes)
