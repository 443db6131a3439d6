from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy


class LearningLoss(Strategy):
    """Learning Loss for AL (Yoo & Kweon 2019): the loss prediction module's predicted loss.

    A higher predicted loss means more uncertain. The module is trained with the backbone by
    the margin ranking loss (tidal.train.LossPredTask; params train.lloss_weight and
    train.lloss_detach_epoch).
    """

    name = "lloss"
    aux = "loss"

    def score(self, out: ModelOutput) -> torch.Tensor:
        return out.pred_loss.float()
