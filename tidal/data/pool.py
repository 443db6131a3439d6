"""Which pool ids are labeled, and the seeded draws that pick initial sets and candidates.

Every draw depends only on (seed, cycle) and the pool's id order, never on the strategy, so
for a given seed all strategies start from the same initial set and see candidate subsets
drawn from the same priority order (paired comparisons).
"""
from __future__ import annotations

import numpy as np


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def initial_labeled_ids(pool_ids: list[str], size: int, seed: int) -> list[str]:
    """A seeded random initial labeled set, returned in pool order."""
    if size > len(pool_ids):
        raise ValueError(f"initial_size={size} is larger than the pool ({len(pool_ids)} samples)")
    chosen = _rng(seed, 0).choice(len(pool_ids), size=size, replace=False)
    return [pool_ids[i] for i in np.sort(chosen)]


def unlabeled_ids(pool_ids: list[str], labeled: set[str] | list[str]) -> list[str]:
    labeled = set(labeled)
    return [i for i in pool_ids if i not in labeled]


def candidate_ids(pool_ids: list[str], labeled: set[str] | list[str], subset_size: int | None,
                  seed: int, cycle: int) -> list[str]:
    """The random subset of unlabeled ids scored this cycle (all of them if subset_size is None).

    A seeded priority over the whole pool, filtered to the unlabeled ids, keeps the subsets of
    different strategies as alike as their labeled sets allow.
    """
    labeled = set(labeled)
    order = _rng(seed, 1000 + cycle).permutation(len(pool_ids))
    out = [pool_ids[i] for i in order if pool_ids[i] not in labeled]
    return out if subset_size is None else out[:subset_size]
