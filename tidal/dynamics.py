"""Training-dynamics recorder: the running mean of each labeled sample's softmax output.

p̄_t = (1/t) Σ_{i≤t} p_i over the epochs of one cycle's training, kept on the training device
as an N×C buffer; an update is a softmax the trainer already computed and an index write.
"""
from __future__ import annotations

import torch


class TDRecorder:
    def __init__(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(num_samples, num_classes, device=device)
        self.count = torch.zeros(num_samples, device=device)

    def update(self, indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Fold this epoch's probabilities for `indices` into the running mean; return p̄ for them.

        Each index must appear at most once per call (one pass over a sample per batch).
        """
        probs = probs.detach().float()
        count = self.count[indices] + 1
        mean = self.mean[indices] + (probs - self.mean[indices]) / count[:, None]
        self.count[indices] = count
        self.mean[indices] = mean
        return mean

    def reset(self) -> None:
        self.mean.zero_()
        self.count.zero_()
