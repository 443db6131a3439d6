from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy


class TiDALMargin(Strategy):
    """Margin of p̃ at the backbone's predicted class: p̃[ŷ] − max_{c≠ŷ} p̃[c].

    A low (even negative) margin means the predicted dynamics disagree with the prediction,
    so the score is the negated margin.
    """

    name = "tidal-margin"
    aux = "td"

    def score(self, out: ModelOutput) -> torch.Tensor:
        p = torch.softmax(out.td_logits.float(), dim=1)
        y_hat = out.logits.argmax(dim=1, keepdim=True)
        at_pred = p.gather(1, y_hat).squeeze(1)
        others = p.scatter(1, y_hat, float("-inf")).max(dim=1).values
        return -(at_pred - others)
