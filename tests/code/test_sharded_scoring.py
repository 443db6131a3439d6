"""Scoring in shards: the exact merge (ties across shards), shard ranges on batch boundaries, the
random streams of random/bald moved past earlier shards, the refusal of set strategies, and the
pipeline's shard + merge steps writing the scores.csv of the unsharded step, byte for byte."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tidal import pipeline
from tidal.config import ConfigError, load_params
from tidal.experiment import prepare_data, start_experiment
from tidal.scoring import merge_top_k, score_shard, shard_range, top_k_uncertain
from tidal.strategies import STRATEGIES, SetStrategy, build_strategy
from tidal.strategies.base import discard_uniform

CPU = torch.device("cpu")


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one stable sort of every candidate, ties to the earlier one."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order, scores[order]


def _shard_tops(scores: torch.Tensor, bounds: list[tuple[int, int]], k: int) -> list:
    parts = []
    for start, stop in bounds:
        pos, top = _top_k(scores[start:stop], k)
        parts.append((pos + start, top))
    return parts


# --- the merge --------------------------------------------------------------------------------

def test_merge_breaks_ties_across_shards_towards_the_earlier_candidate():
    scores = torch.tensor([5.0, 1.0, 5.0, 5.0, 2.0, 5.0])
    parts = _shard_tops(scores, [(0, 2), (2, 4), (4, 6)], k=3)
    pos, top = merge_top_k(parts, 3)
    assert pos.tolist() == [0, 2, 3] and top.tolist() == [5.0, 5.0, 5.0]
    # The shards' order in the list does not matter: ties are broken by candidate number.
    pos_rev, _ = merge_top_k(parts[::-1], 3)
    assert pos_rev.tolist() == [0, 2, 3]


def test_merge_equals_one_sort_for_many_tied_scores_and_shardings():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 120))
        scores = torch.tensor(rng.integers(0, 4, n), dtype=torch.float32)  # 4 values: ties everywhere
        k = int(rng.integers(1, n + 3))
        cuts = sorted(set(rng.integers(0, n + 1, int(rng.integers(0, 6))).tolist()) | {0, n})
        bounds = list(zip(cuts[:-1], cuts[1:]))
        pos, top = merge_top_k(_shard_tops(scores, bounds, k), k)
        ref_pos, ref_top = _top_k(scores, k)
        assert pos.tolist() == ref_pos.tolist(), (trial, scores.tolist(), bounds, k)
        assert torch.equal(top, ref_top)


def test_merge_refuses_a_candidate_listed_by_two_shards():
    part = (torch.tensor([3, 4]), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="same candidate"):
        merge_top_k([part, part], 2)


# --- shard ranges -----------------------------------------------------------------------------

def test_shard_ranges_tile_the_candidates_in_whole_batches():
    for n in (0, 1, 7, 64, 65, 1000, 1397):
        for n_shards in (1, 2, 3, 8):
            for batch in (1, 16, 64, 512):
                bounds = [shard_range(n, s, n_shards, batch) for s in range(n_shards)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(start % batch == 0 for start, stop in bounds if stop > start)
    assert shard_range(1000, 1, 3, 64) == (384, 768)
    with pytest.raises(ValueError, match="shard 3"):
        shard_range(10, 3, 3, 4)


# --- scoring shards with real strategies ------------------------------------------------------

class TinyBackbone(nn.Module):
    """Images N×D×1×1 uint8 -> features in [-1, 1] -> a fixed linear head (bald reads `head`)."""

    def __init__(self, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(d, c)
        with torch.no_grad():
            self.head.weight.copy_(torch.linspace(-2, 2, c * d).reshape(c, d))
            self.head.bias.zero_()
        self.stage_channels = [d]

    def forward(self, x):
        return self.head(torch.flatten(x, 1)), [x]


def _pool(n: int = 90, d: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 4, (n, d)) * 60  # few distinct images: many tied scores
    return torch.tensor(rows, dtype=torch.uint8)[:, :, None, None]


@pytest.mark.parametrize("name", ["entropy", "margin", "random", "bald"])
def test_shards_merge_to_the_unsharded_top_k(name):
    """random and bald draw per candidate: a shard skips the draws of the candidates before it."""
    pool = _pool()
    positions = torch.from_numpy(np.random.default_rng(2).permutation(len(pool))[:80])  # the candidates
    backbone, k, batch = TinyBackbone(), 25, 8
    ref_pos, ref_scores = top_k_uncertain(backbone, None, pool[positions], build_strategy(name, seed=7), k, CPU, batch)
    for n_shards in (2, 3, 5):
        parts = []
        for shard in range(n_shards):
            start, stop = shard_range(len(positions), shard, n_shards, batch)
            released = []
            parts.append(score_shard(backbone, None, pool, positions[start:stop], start, build_strategy(name, seed=7),
                                     k, CPU, batch, release=lambda: released.append(1)))
            assert len(released) == -(-(stop - start) // batch)  # pages released after every batch
        pos, scores = merge_top_k(parts, k)
        assert pos.tolist() == ref_pos.tolist(), n_shards
        assert torch.equal(scores, ref_scores)


def test_discard_uniform_moves_the_generator_as_far_as_rand():
    whole = torch.rand(3000, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    discard_uniform(g, 1234, chunk=100)
    assert torch.equal(torch.rand(3000 - 1234, generator=g), whole[1234:])


# --- set strategies refuse shards -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(n for n, cls in STRATEGIES.items() if issubclass(cls, SetStrategy)))
def test_set_strategies_refuse_shards(name, tmp_path):
    # Refused when the params are read, before anything runs ...
    with pytest.raises(ConfigError, match=rf"'scoring.shards' must be 1 with strategy '{name}'.*jointly"):
        load_params(None, [f"strategy={name}", "scoring.shards=2", f"runs_dir={tmp_path}"])
    # ... and by the library's shard scorer, whatever called it.
    with pytest.raises(TypeError, match="chooses a set jointly"):
        score_shard(nn.Linear(1, 1), None, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4), 0,
                    build_strategy(name), 2, torch.device("cpu"))


def test_pointwise_strategies_accept_shards():
    for name, cls in STRATEGIES.items():
        if not issubclass(cls, SetStrategy):
            assert load_params(None, [f"strategy={name}", "scoring.shards=4"])["scoring"]["shards"] == 4


# --- the pipeline steps: shards + merge == score_step, byte for byte --------------------------

@pytest.mark.parametrize("name", ["entropy", "bald", "random"])
def test_shard_and_merge_steps_write_the_scores_of_score_step(name, tmp_path, data_root):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}",
                                f"strategy={name}", "tracking=false", "train.epochs=1", "bald_passes=3",
                                "subset_size=640", "score_batch_size=64"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    single = pipeline.score_step(params, 0, checkpoint)
    expected = open(single, "rb").read()
    for n_shards in (2, 3):
        (tmp_path / params["experiment"] / "cycles/0/scores.csv").unlink()
        results = [pipeline.score_shard_step(params, 0, checkpoint, s, n_shards) for s in range(n_shards)]
        assert [r["stop"] - r["start"] for r in results] == ([320, 320] if n_shards == 2 else [256, 256, 128])
        merged = pipeline.merge_scores_step(params, 0, [r["path"] for r in results])
        assert open(merged, "rb").read() == expected, n_shards
        # Resumable: a shard done is not scored again.
        assert pipeline.score_shard_step(params, 0, checkpoint, 0, n_shards)["resumed"] is True


def test_merge_refuses_shards_that_do_not_tile_the_candidates(tmp_path, data_root):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}",
                                "strategy=entropy", "tracking=false", "train.epochs=1", "score_batch_size=32"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    halves = [pipeline.score_shard_step(params, 0, checkpoint, s, 2)["path"] for s in range(2)]
    thirds = [pipeline.score_shard_step(params, 0, checkpoint, s, 3)["path"] for s in range(3)]
    with pytest.raises(Exception, match="do not cover cycle 0's candidates exactly once"):
        pipeline.merge_scores_step(params, 0, [halves[0], thirds[2]])
    assert not (tmp_path / params["experiment"] / "cycles/0/scores.csv").exists()
