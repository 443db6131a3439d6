from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy


class LeastConfidence(Strategy):
    """1 − max softmax of the backbone."""

    name = "least-confidence"

    def score(self, out: ModelOutput) -> torch.Tensor:
        return 1.0 - torch.softmax(out.logits.float(), dim=1).max(dim=1).values
