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


def candidate_positions(pool_size: int, taken: np.ndarray, subset_size: int | None, seed: int,
                        cycle: int) -> np.ndarray:
    """Pool positions of the random subset of unlabeled samples scored this cycle (all of them if
    subset_size is None), in draw order; `taken` holds the positions that are not candidates.

    A seeded priority over the whole pool, filtered to the unlabeled samples, keeps the subsets
    of different strategies as alike as their labeled sets allow. Memory: 17 bytes per pool
    sample (the priority, a mask, the filtered order), never a string per sample.
    """
    order = _rng(seed, 1000 + cycle).permutation(pool_size)
    free = np.ones(pool_size, dtype=bool)
    free[np.asarray(taken, dtype=np.int64)] = False
    out = order[free[order]]
    return out if subset_size is None else out[:subset_size]


def candidate_ids(pool_ids: list[str], labeled: set[str] | list[str], subset_size: int | None,
                  seed: int, cycle: int) -> list[str]:
    """The ids of `candidate_positions`: the same draw, for a pool held as a list of ids."""
    labeled = set(labeled)
    taken = np.array([i for i, sid in enumerate(pool_ids) if sid in labeled], dtype=np.int64)
    return [pool_ids[i] for i in candidate_positions(len(pool_ids), taken, subset_size, seed, cycle).tolist()]
