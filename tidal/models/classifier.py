"""What an MLflow model of a cycle holds: the backbone behind the trainer's input normalization."""
from __future__ import annotations

import torch
from torch import nn



def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to [-1, 1]: what every backbone is trained on (tidal.train)."""
    return (x - 0.5) / 0.5


class Classifier(nn.Module):
    """Float images in [0, 1] (N×C×H×W) -> class logits; the auxiliary modules stay out.

    A module-level class, so a model saved with pickle loads wherever `tidal` is installed.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.net = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(x))[0]
