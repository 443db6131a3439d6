from __future__ import annotations

import torch

from tidal.strategies.base import ModelOutput, Strategy, discard_uniform


class RandomSampling(Strategy):
    """Uniformly random scores from a seeded generator: the baseline every method must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, out: ModelOutput) -> torch.Tensor:
        return torch.rand(len(out.logits), generator=self.generator).to(out.logits.device)

    def skip(self, n: int) -> None:
        discard_uniform(self.generator, n)  # one draw per candidate
