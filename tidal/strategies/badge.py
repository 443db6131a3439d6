"""BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings.

A candidate's gradient embedding is the gradient of the cross-entropy at its own predicted
label ŷ with respect to the head's weights: g = (p − onehot(ŷ)) ⊗ h, with p the backbone's
softmax and h the penultimate features. Its norm grows with uncertainty; k-means++ seeding
picks k of them that are both large and diverse.

The C·D-dimensional g is never built: with a = p − onehot(ŷ),
    ‖g_i − g_j‖² = ‖a_i‖²‖h_i‖² + ‖a_j‖²‖h_j‖² − 2 (a_i·a_j)(h_i·h_j),
so memory is N·(C + D) and each pick costs one N×C and one N×D product against the new center.

Seeding as in the authors' code: the first center is the largest ‖g‖; each further one is drawn
with probability ∝ D² (squared distance to the nearest chosen center) from the strategy's
seeded generator, so a seed gives the same picks. Picked candidates have weight 0 and are never
drawn again; if every remaining weight is 0 (duplicates of chosen centers), the earliest
unpicked position is taken.

Score in scores.csv: the D² weight of each pick when it was drawn (‖g‖² for the first).
"""
from __future__ import annotations

import torch

from tidal.strategies.base import Embeddings, SetStrategy


def gradient_embedding_factors(logits: torch.Tensor, features: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, h) with g = a ⊗ h: a = softmax − onehot(argmax), N×C; h = features, N×D."""
    p = torch.softmax(logits.float(), dim=1)
    a = p - torch.nn.functional.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)
    return a, features.float()


def kmeans_pp_seeding(a: torch.Tensor, h: torch.Tensor, k: int, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeds over g_i = a_i ⊗ h_i: positions in order, and each one's D² weight."""
    n = len(a)
    k = min(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    sq = (a * a).sum(dim=1) * (h * h).sum(dim=1)  # ‖g_i‖²
    picked = torch.zeros(n, dtype=torch.bool, device=a.device)

    def sq_distances_to(j: int) -> torch.Tensor:
        return (sq + sq[j] - 2.0 * (a @ a[j]) * (h @ h[j])).clamp_min(0.0)

    j = int(sq.argmax())
    picks, weights = [j], [sq[j]]
    picked[j] = True
    min_d2 = sq_distances_to(j)
    while len(picks) < k:
        w = min_d2.masked_fill(picked, 0.0)
        w_cpu = w.double().cpu()
        if w_cpu.sum() > 0:
            j = int(torch.multinomial(w_cpu, 1, generator=generator))
        else:
            j = int((~picked).nonzero()[0])
        picks.append(j)
        weights.append(w[j])
        picked[j] = True
        min_d2 = torch.minimum(min_d2, sq_distances_to(j))
    return torch.tensor(picks, dtype=torch.long), torch.stack(weights).float().cpu()


class BADGE(SetStrategy):
    name = "badge"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, candidates: Embeddings, labeled: Embeddings | None, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = gradient_embedding_factors(candidates.logits, candidates.features)
        return kmeans_pp_seeding(a, h, k, self.generator)
