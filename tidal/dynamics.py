"""Training-dynamics recorder: the running mean of each labeled sample's softmax output.

p̄_t = (1/t) Σ_{i≤t} p_i over the epochs of one cycle's training, kept on the training device
as an N×C buffer; an update is a softmax the trainer already computed and an index write.

Data-parallel training (tidal.train_ddp): each rank updates the samples it trained on, and at
the end of every epoch `combine` gives every rank the rows updated anywhere. Each sample is
updated by exactly one rank per epoch, so the combined row is that rank's own (p̄, count), copied
exactly: the next epoch's target includes every earlier epoch, whichever rank computed it.
"""
from __future__ import annotations

from typing import Callable

import torch


class TDRecorder:
    def __init__(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        # p̄ (and its counts, exact integers either way) in the model's dtype: float32, or float64
        # for a float64 model (the reference test), whose probabilities a float32 buffer would
        # round to float32 every epoch.
        self.mean = torch.zeros(num_samples, num_classes, device=device, dtype=dtype)
        self.count = torch.zeros(num_samples, device=device, dtype=dtype)
        # Rows this process updated since the last `combine` (what it contributes there).
        self.touched = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def update(self, indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Fold this epoch's probabilities for `indices` into the running mean; return p̄ for them.

        Each index must appear at most once per call (one pass over a sample per batch).
        """
        probs = probs.detach().to(self.mean.dtype)
        count = self.count[indices] + 1
        mean = self.mean[indices] + (probs - self.mean[indices]) / count[:, None]
        self.count[indices] = count
        self.mean[indices] = mean
        self.touched[indices] = True
        return mean

    def contribution(self) -> torch.Tensor:
        """This process's updates since the last combine, for a sum over processes: an N×(C+2)
        tensor with rows [p̄, count, 1] where updated here and zeros elsewhere."""
        touched = self.touched.to(self.mean.dtype)
        return torch.cat([self.mean * touched[:, None], (self.count * touched)[:, None], touched[:, None]], dim=1)

    def apply(self, total: torch.Tensor) -> None:
        """Take the sum of every process's `contribution`: rows updated by one process get its p̄ and count.

        A row updated by two processes in one epoch means their batches overlapped (a bug): error.
        """
        visits = total[:, -1]
        if bool((visits > 1).any()):
            raise RuntimeError(f"{int((visits > 1).sum())} sample(s) were updated by more than one process "
                               f"in one epoch; the ranks' batches must not overlap")
        updated = visits > 0
        # x + 0.0 == x: the summed row is the updating process's row, bit for bit.
        self.mean[updated] = total[updated, :-2]
        self.count[updated] = total[updated, -2]
        self.touched.zero_()

    def combine(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Merge this epoch's updates of all processes; `all_reduce` sums a tensor across them in place."""
        total = self.contribution()
        all_reduce(total)
        self.apply(total)

    def reset(self) -> None:
        self.mean.zero_()
        self.count.zero_()
        self.touched.zero_()
