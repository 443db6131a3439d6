"""Learning Loss for AL (Yoo & Kweon, CVPR 2019): a module that predicts a sample's training loss.

Architecture as in the paper (and the TD module): per backbone stage, global average pool ->
Linear(C_i, hidden) -> ReLU; concatenate; Linear -> one number, the predicted loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LossPredictor(nn.Module):
    """Predicted loss of each sample from the backbone's stage features: B×C_i×H×W list -> B."""

    def __init__(self, stage_channels: list[int], hidden: int = 128) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(c, hidden) for c in stage_channels)
        self.out = nn.Linear(hidden * len(stage_channels), 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pooled = [torch.relu(fc(f.mean(dim=(2, 3)))) for fc, f in zip(self.branches, features)]
        return self.out(torch.cat(pooled, dim=1)).squeeze(1)


def loss_ranking_loss(pred_loss: torch.Tensor, true_loss: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The paper's margin ranking loss between predicted and true per-sample losses.

    The batch is split in halves and sample i of the first half is paired with sample i of the
    second (an odd batch leaves its last sample out). For a pair (i, j) with target sign
    s = +1 if l_i > l_j else -1: max(0, -s·(p_i - p_j) + margin), averaged over the pairs.
    The true losses are a fixed target (detached).
    """
    h = len(pred_loss) // 2
    if h == 0:
        return pred_loss.sum() * 0.0
    true_loss = true_loss.detach()
    sign = torch.where(true_loss[:h] > true_loss[h:2 * h], 1.0, -1.0).to(pred_loss.dtype)
    return F.relu(margin - sign * (pred_loss[:h] - pred_loss[h:2 * h])).mean()
