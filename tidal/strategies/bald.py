"""BALD (Houlsby et al. 2011; Gal et al. 2017): mutual information between the prediction and
the model weights, estimated with MC dropout.

score = H(mean_t p_t) − mean_t H(p_t) over T stochastic passes: high when the passes each are
confident but disagree with one another.

Design: the dropout lives on the head's input (the penultimate, global-average-pooled
features). The backbone runs once per batch in eval mode (BatchNorm uses its running
statistics); then the head runs T times on those features, each time with a fresh dropout mask
at rate p (kept units scaled by 1/(1−p), as in training-mode dropout). For a SmallCNN trained
with `dropout: p` this is exactly MC dropout of that model (its only dropout sits there); for a
model trained without dropout it is last-layer MC dropout applied at scoring time. It costs one
backbone pass plus T small head passes, not T backbone passes.

Params: `bald_passes` (T, default 10) and `bald_dropout` (p, default 0.5; set it to the
training `dropout` when that is > 0).

Masks come from the strategy's own seeded CPU generator, drawn sample-major (B×T×D), so a
seed gives the same scores whatever the batch size and device; `skip(n)` moves the generator
past n candidates' masks (n×T×D draws, made at the next `score`, once D is known), so a shard
of the candidates scored alone gets the masks of an unsharded run.
"""
from __future__ import annotations

from typing import Any

import torch

from tidal.strategies.base import ModelOutput, Strategy, discard_uniform, entropy


class BALD(Strategy):
    name = "bald"
    uses_head = True

    def __init__(self, seed: int = 0, passes: int = 10, dropout: float = 0.5) -> None:
        super().__init__(seed)
        if passes < 1:
            raise ValueError(f"bald_passes must be at least 1, got {passes}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"bald_dropout must be in (0, 1), got {dropout}")
        self.passes = passes
        self.dropout = dropout
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped = 0  # candidates whose masks are still to be drawn and dropped

    @classmethod
    def from_params(cls, params: dict[str, Any], seed: int = 0) -> "BALD":
        return cls(seed=seed, passes=params["bald_passes"], dropout=params["bald_dropout"])

    def score(self, out: ModelOutput) -> torch.Tensor:
        h = out.embedding.float()
        b, d = h.shape
        t = self.passes
        if self.skipped:
            discard_uniform(self.generator, self.skipped * t * d)
            self.skipped = 0
        keep = torch.rand(b, t, d, generator=self.generator) >= self.dropout
        dropped = h[:, None, :] * keep.to(h.device) / (1.0 - self.dropout)  # B×T×D
        probs = torch.softmax(out.head(dropped.reshape(b * t, d)).float(), dim=1)  # (B·T)×C
        mean_entropy = entropy(probs).reshape(b, t).mean(dim=1)
        entropy_of_mean = entropy(probs.reshape(b, t, -1).mean(dim=1))
        return (entropy_of_mean - mean_entropy).clamp_min(0.0)

    def skip(self, n: int) -> None:
        self.skipped += n
