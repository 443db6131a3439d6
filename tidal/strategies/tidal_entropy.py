from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy, entropy


class TiDALEntropy(Strategy):
    """Entropy of the TD module's predicted cumulative softmax p̃."""

    name = "tidal-entropy"
    aux = "td"

    def score(self, out: ModelOutput) -> torch.Tensor:
        return entropy(torch.softmax(out.td_logits.float(), dim=1))
