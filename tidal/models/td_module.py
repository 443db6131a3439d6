"""The TD prediction module: predicts a sample's cumulative training dynamics from features."""
from __future__ import annotations

import torch
from torch import nn


class TDPredictor(nn.Module):
    """Per stage: global average pool -> Linear(C_i, hidden) -> ReLU; concat; Linear -> logits."""

    def __init__(self, stage_channels: list[int], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.branches = nn.ModuleList(nn.Linear(c, hidden) for c in stage_channels)
        self.out = nn.Linear(hidden * len(stage_channels), num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pooled = [torch.relu(fc(f.mean(dim=(2, 3)))) for fc, f in zip(self.branches, features)]
        return self.out(torch.cat(pooled, dim=1))
