"""CoreSet (Sener & Savarese 2018): k-center greedy on the backbone's penultimate features.

Each pick is the candidate farthest from its nearest center, where the centers are the
labeled samples plus the candidates picked so far. With no labeled samples, the first pick is
the candidate farthest from the candidates' mean.

Memory: a running min-distance vector (N) to the centers. The labeled centers enter in chunks
(at most CHUNK_ELEMENTS distances at a time); each pick then costs one N×D difference against
the new center. No N×N (or N×M) matrix is ever built.

Score in scores.csv: the Euclidean distance to the nearest center at the time of the pick
(non-increasing along the selection order).
"""
from __future__ import annotations

import torch

from tidal.strategies.base import Embeddings, SetStrategy

CHUNK_ELEMENTS = 1 << 22  # distances held at once while folding in the labeled centers (16 MiB fp32)


def min_sq_distances(x: torch.Tensor, centers: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
                     ) -> torch.Tensor:
    """For each row of x (N×D), the squared distance to its nearest row of centers (M×D)."""
    n = len(x)
    out = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    x_sq = (x * x).sum(dim=1)
    step = max(1, chunk_elements // max(n, 1))
    for start in range(0, len(centers), step):
        c = centers[start:start + step]
        d2 = x_sq[:, None] + (c * c).sum(dim=1)[None, :] - 2.0 * (x @ c.T)
        out = torch.minimum(out, d2.min(dim=1).values.clamp_min(0.0))
    return out


def k_center_greedy(x: torch.Tensor, centers: torch.Tensor | None, k: int,
                    chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into x) of k greedy k-center picks, in order, and each one's distance at pick time."""
    n = len(x)
    k = min(k, n)
    picks: list[int] = []
    dists: list[torch.Tensor] = []
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    if centers is not None and len(centers) > 0:
        min_d2 = min_sq_distances(x, centers, chunk_elements)
    else:
        d2_mean = ((x - x.mean(dim=0)) ** 2).sum(dim=1)
        first = int(d2_mean.argmax())
        picks.append(first)
        dists.append(d2_mean[first].sqrt())
        picked[first] = True
        min_d2 = ((x - x[first]) ** 2).sum(dim=1)
    while len(picks) < k:
        d2 = min_d2.masked_fill(picked, float("-inf"))
        j = int(d2.argmax())  # ties: the earliest position
        picks.append(j)
        dists.append(d2[j].clamp_min(0.0).sqrt())
        picked[j] = True
        min_d2 = torch.minimum(min_d2, ((x - x[j]) ** 2).sum(dim=1))
    return torch.tensor(picks, dtype=torch.long), torch.stack(dists).float().cpu()


class CoreSet(SetStrategy):
    name = "coreset"
    uses_labeled = True

    def select(self, candidates: Embeddings, labeled: Embeddings | None, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        x = candidates.features.float()
        centers = labeled.features.float().to(x.device) if labeled is not None else None
        return k_center_greedy(x, centers, k)
