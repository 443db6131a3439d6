from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy


class Margin(Strategy):
    """Margin of the backbone's softmax: top-1 minus top-2. A small margin is uncertain, so the
    score is the negated margin."""

    name = "margin"

    def score(self, out: ModelOutput) -> torch.Tensor:
        top2 = torch.softmax(out.logits.float(), dim=1).topk(2, dim=1).values
        return -(top2[:, 0] - top2[:, 1])
