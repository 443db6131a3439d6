from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy, entropy


class Entropy(Strategy):
    """Entropy of the backbone's softmax."""

    name = "entropy"

    def score(self, out: ModelOutput) -> torch.Tensor:
        return entropy(torch.softmax(out.logits.float(), dim=1))
