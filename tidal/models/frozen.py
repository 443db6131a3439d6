"""The trainable part of a network whose backbone is frozen: the head, on cached stage features.

With `train.backbone_mode: frozen` the backbone never changes, so each image's pooled stage
features are computed once (tidal.features) and a cycle trains only this head and the auxiliary
module on them. TiDAL's TD module and Learning Loss's module pool each stage before their linear
layers, so a pooled stage vector given as a C×1×1 map is exactly what they read from the full
network: the same method, over a fixed feature extractor.
"""
from __future__ import annotations

import torch
from torch import nn


class FrozenHead(nn.Module):
    """Rows of concatenated pooled stage features (B × sum(stage_channels)) -> (logits, stages).

    The stages come back as B×C_i×1×1 maps, as a backbone returns them; the last is the head's
    input (the network's pre-logits). `head` has the shape and name of the full network's, so its
    weights move between the two as they are.
    """

    def __init__(self, stage_channels: list[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.stage_channels = list(stage_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.stage_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = [part[:, :, None, None] for part in x.split(self.stage_channels, dim=1)]
        return self.head(self.dropout(features[-1].flatten(1))), features


def pooled_stages(features: list[torch.Tensor]) -> torch.Tensor:
    """A backbone's stage maps, each global-average-pooled, concatenated: B × sum(C_i)."""
    return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)
