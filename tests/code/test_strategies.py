"""Query strategies through tidal.scoring.top_k_uncertain, and the seeded pool draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tidal.data.pool import candidate_ids, initial_labeled_ids, unlabeled_ids
from tidal.scoring import top_k_uncertain
from tidal.strategies import STRATEGIES, Strategy, build_strategy

C = 4
SCALE = 8.0
CPU = torch.device("cpu")


class FakeBackbone(nn.Module):
    """Reads its logits from row 0 of the (normalized) image; row 1 is its only 'feature stage'.

    Pixel value v (0..255) becomes logit SCALE * (2 * v / 255 - 1), so tests set logits exactly.
    """

    stage_channels = [1]

    def forward(self, x):
        return x[:, 0, 0, :] * SCALE, [x[:, :, 1:2, :]]


class FakeTD(nn.Module):
    """TD 'module': its logits are row 1 of the image, read from the backbone's feature."""

    num_classes = C

    def forward(self, features):
        return features[0][:, 0, 0, :] * SCALE


def _images(backbone_rows, td_rows=None) -> torch.Tensor:
    """uint8 images N×1×2×C from per-sample pixel rows for the backbone and the TD module."""
    bb = np.asarray(backbone_rows, dtype=np.uint8)
    td = bb if td_rows is None else np.asarray(td_rows, dtype=np.uint8)
    return torch.from_numpy(np.stack([bb, td], axis=1)[:, None])


class FakeLossModule(nn.Module):
    """Loss prediction 'module': its predicted loss is the mean of row 1 of the image."""

    def forward(self, features):
        return features[0][:, 0, 0, :].mean(dim=1)


def _select(name: str, images, k: int, batch_size: int = 512, seed: int = 0):
    strategy = build_strategy(name, seed=seed)
    aux = FakeLossModule() if strategy.aux == "loss" else FakeTD()
    pos, scores = top_k_uncertain(FakeBackbone(), aux, images, strategy, k, CPU, batch_size)
    return pos.tolist(), scores


UNIFORM = [128] * C


def peaked(c: int, height: int = 255) -> list[int]:
    row = [0] * C
    row[c] = height
    return row


def _random_images(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 1, 2, C), dtype=np.uint8))


# Pointwise strategies that FakeBackbone can serve (no head); bald and the set strategies
# (coreset, badge) are tested in test_strategies_extra.py.
POINTWISE = sorted(n for n, cls in STRATEGIES.items() if issubclass(cls, Strategy) and not cls.uses_head)


def test_registry_holds_the_strategies():
    assert set(STRATEGIES) == {"random", "entropy", "tidal-entropy", "tidal-margin", "margin",
                               "least-confidence", "bald", "coreset", "badge", "lloss"}


@pytest.mark.parametrize("name", POINTWISE)
@pytest.mark.parametrize("k", [1, 5, 13])
def test_selects_exactly_k_distinct_positions(name, k):
    images = _random_images(37, seed=3)
    pos, scores = _select(name, images, k, batch_size=8)
    assert len(pos) == k
    assert len(set(pos)) == k
    assert all(0 <= p < len(images) for p in pos)
    assert len(scores) == k
    # best first
    assert all(scores[i] >= scores[i + 1] for i in range(k - 1))


@pytest.mark.parametrize("name", POINTWISE)
def test_k_larger_than_candidates_returns_all(name):
    images = _random_images(6, seed=4)
    pos, _ = _select(name, images, k=10, batch_size=4)
    assert sorted(pos) == list(range(6))


@pytest.mark.parametrize("name", POINTWISE)
def test_result_independent_of_batch_size(name):
    images = _random_images(53, seed=5)
    ref_pos, ref_scores = _select(name, images, k=11, batch_size=512, seed=9)
    for batch_size in (1, 4, 10, 53):
        pos, scores = _select(name, images, k=11, batch_size=batch_size, seed=9)
        assert pos == ref_pos, f"batch_size={batch_size}"
        assert torch.equal(scores, ref_scores)


def test_entropy_prefers_uniform_over_peaked():
    rows = [peaked(i % C) for i in range(10)]
    for p in (2, 5, 7):
        rows[p] = UNIFORM
    rows[8] = [200, 180, 0, 0]  # two classes close: more uncertain than peaked, less than uniform
    pos, scores = _select("entropy", _images(rows), k=4, batch_size=3)
    assert pos[:3] == [2, 5, 7]  # equal entropy: earlier position first
    assert pos[3] == 8
    assert scores[0] == pytest.approx(np.log(C), rel=1e-5)
    assert scores[3] < scores[2]


def test_tidal_entropy_uses_td_logits_not_backbone_logits():
    n = 8
    backbone_rows = [peaked(0) for _ in range(n)]
    td_rows = [peaked(1) for _ in range(n)]
    backbone_rows[1] = UNIFORM  # the backbone is unsure about 1 and 3
    backbone_rows[3] = UNIFORM
    td_rows[4] = UNIFORM  # the TD module is unsure about 4 and 6
    td_rows[6] = UNIFORM
    images = _images(backbone_rows, td_rows)
    tidal_pos, _ = _select("tidal-entropy", images, k=2)
    entropy_pos, _ = _select("entropy", images, k=2)
    assert tidal_pos == [4, 6]
    assert entropy_pos == [1, 3]


def test_tidal_strategies_need_the_td_module():
    images = _random_images(4, seed=0)
    for name in ("tidal-entropy", "tidal-margin"):
        with pytest.raises(ValueError, match=name):
            top_k_uncertain(FakeBackbone(), None, images, build_strategy(name), 2, CPU)


def test_tidal_margin_disagreement_ranks_first():
    n = 7
    backbone_rows = [peaked(0) for _ in range(n)]  # the backbone predicts class 0 everywhere
    td_rows = [peaked(0) for _ in range(n)]  # the TD module agrees, confidently ...
    td_rows[2] = [220, 0, 0, 0]  # ... less confidently here (small positive margin)
    td_rows[5] = peaked(3)  # disagrees: p̃[ŷ=0] < p̃[3] -> negative margin
    td_rows[4] = [128, 128, 0, 0]  # tie between ŷ and class 1 -> margin 0
    images = _images(backbone_rows, td_rows)
    pos, scores = _select("tidal-margin", images, k=3, batch_size=2)
    assert pos == [5, 4, 2]
    assert scores[0] > 0  # score = -margin, margin negative
    assert scores[1] == pytest.approx(0.0, abs=1e-6)
    assert scores[2] < 0


def test_tidal_margin_uses_backbone_argmax_as_y_hat():
    # Same TD output, different backbone predictions: the margin is taken at the backbone's class.
    td_row = [255, 200, 0, 0]  # p̃ peaks at class 0, class 1 second
    images = _images([peaked(0), peaked(1)], [td_row, td_row])
    pos, scores = _select("tidal-margin", images, k=2)
    assert pos == [1, 0]  # ŷ=1 disagrees with the module's top class -> more uncertain
    assert scores[0] > 0 > scores[1]
    torch.testing.assert_close(scores[0], -scores[1])


def test_random_same_seed_same_selection_different_seed_different():
    images = _random_images(200, seed=1)
    a, _ = _select("random", images, k=20, seed=3)
    b, _ = _select("random", images, k=20, seed=3)
    c, _ = _select("random", images, k=20, seed=4)
    assert a == b
    assert a != c
    assert len(set(a)) == 20 and len(set(c)) == 20


def test_random_ignores_model_outputs():
    seed_images = _random_images(50, seed=1)
    other_images = _random_images(50, seed=2)
    a, _ = _select("random", seed_images, k=10, seed=7)
    b, _ = _select("random", other_images, k=10, seed=7)
    assert a == b


@pytest.mark.parametrize("name", ["entropy", "tidal-entropy", "tidal-margin"])
@pytest.mark.parametrize("batch_size", [1, 3, 512])
def test_ties_keep_earlier_position(name, batch_size):
    # All candidates identical -> all scores equal -> the first k positions, in order.
    images = _images([[255, 10, 0, 40]] * 12, [[30, 200, 90, 0]] * 12)
    pos, scores = _select(name, images, k=5, batch_size=batch_size)
    assert pos == [0, 1, 2, 3, 4]
    assert len(set(scores.tolist())) == 1


def test_ties_keep_earlier_position_among_the_most_uncertain():
    rows = [peaked(0) for _ in range(12)]
    for p in (9, 3, 10, 6):
        rows[p] = UNIFORM
    for batch_size in (1, 2, 5, 512):
        pos, _ = _select("entropy", _images(rows), k=3, batch_size=batch_size)
        assert pos == [3, 6, 9]


# --- tidal.data.pool ------------------------------------------------------------------------

POOL = [f"s-{i:04d}" for i in range(300)]


def test_initial_labeled_ids_seeded_and_reproducible():
    a = initial_labeled_ids(POOL, 40, seed=0)
    b = initial_labeled_ids(POOL, 40, seed=0)
    c = initial_labeled_ids(POOL, 40, seed=1)
    assert a == b
    assert a != c
    assert len(a) == 40 and len(set(a)) == 40
    assert set(a) <= set(POOL)
    assert a == sorted(a, key=POOL.index)  # returned in pool order
    assert a != POOL[:40]  # actually random, not the head of the pool


def test_initial_labeled_ids_too_large_raises():
    with pytest.raises(ValueError, match="initial_size"):
        initial_labeled_ids(POOL[:5], 6, seed=0)


def test_candidate_ids_excludes_labeled_no_duplicates_respects_subset_size():
    labeled = set(initial_labeled_ids(POOL, 120, seed=2))
    for subset_size in (1, 50, 180):
        cands = candidate_ids(POOL, labeled, subset_size, seed=2, cycle=1)
        assert len(cands) == subset_size
        assert len(set(cands)) == len(cands)
        assert not set(cands) & labeled
    # larger than the unlabeled set: all of it, once each
    everything = candidate_ids(POOL, labeled, 10_000, seed=2, cycle=1)
    assert sorted(everything) == sorted(unlabeled_ids(POOL, labeled))
    assert candidate_ids(POOL, labeled, None, seed=2, cycle=1) == everything


def test_candidate_ids_seeded_per_cycle():
    labeled = initial_labeled_ids(POOL, 30, seed=0)
    a = candidate_ids(POOL, labeled, 50, seed=0, cycle=0)
    assert a == candidate_ids(POOL, labeled, 50, seed=0, cycle=0)
    assert a != candidate_ids(POOL, labeled, 50, seed=0, cycle=1)
    assert a != candidate_ids(POOL, labeled, 50, seed=1, cycle=0)
    assert a != sorted(a)  # a random subset, not the pool's order


def test_candidate_ids_share_one_priority_order_across_labeled_sets():
    # Different strategies label different ids; their candidate lists are the same priority
    # order filtered by their own labeled set.
    small = set(initial_labeled_ids(POOL, 30, seed=0))
    extra = set(POOL[100:140])
    full_small = candidate_ids(POOL, small, None, seed=0, cycle=2)
    full_big = candidate_ids(POOL, small | extra, None, seed=0, cycle=2)
    assert full_big == [i for i in full_small if i not in extra]
