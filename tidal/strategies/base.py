"""What every query strategy sees, and the one method it implements."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Outputs for one batch of candidates (eval mode, no augmentation)."""

    logits: torch.Tensor  # backbone class logits, B×C
    td_logits: torch.Tensor | None = None  # TD module logits, B×C (TiDAL strategies only)


class Strategy:
    """A query strategy scores candidates; higher score = more uncertain = labeled sooner."""

    name: str = ""
    uses_td_module: bool = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, out: ModelOutput) -> torch.Tensor:
        raise NotImplementedError


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ p log p, with 0·log 0 taken as 0."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=1)
