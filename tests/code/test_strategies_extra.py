"""margin, least-confidence, bald (pointwise) and coreset, badge (set strategies): hand-built
cases with known answers, memory bounds, and every registered strategy through the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.experiment import prepare_data, start_experiment
from tidal.models import build_backbone
from tidal.scoring import select_candidates, top_k_uncertain
from tidal.strategies import STRATEGIES, Embeddings, SetStrategy, build_strategy
from tidal.strategies.badge import gradient_embedding_factors, kmeans_pp_seeding
from tidal.strategies.coreset import k_center_greedy

CPU = torch.device("cpu")


class FeatureBackbone(nn.Module):
    """Images are N×D×1×1 uint8; pixel v becomes feature v/255, the one stage and the head's input.

    The head is a bias-free Linear whose weight the test sets, so logits = head(features).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(weight)
        self.stage_channels = [weight.shape[1]]

    def forward(self, x):
        f = (x + 1) / 2  # undo normalize: back to v/255
        return self.head(torch.flatten(f, 1)), [f]


def _images(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)[:, :, None, None]


def _identity_backbone(c: int, scale: float = 10.0) -> FeatureBackbone:
    return FeatureBackbone(scale * torch.eye(c))


def _pointwise(name, backbone, images, k, batch_size=512, seed=0, **kw):
    strategy = STRATEGIES[name](seed=seed, **kw)
    pos, scores = top_k_uncertain(backbone, None, images, strategy, k, CPU, batch_size)
    return pos.tolist(), scores


# --- margin and least-confidence ------------------------------------------------------------

def test_registry_holds_margin_least_confidence_bald_coreset_and_badge():
    assert {"margin", "least-confidence", "bald", "coreset", "badge"} <= set(STRATEGIES)
    assert issubclass(STRATEGIES["coreset"], SetStrategy) and issubclass(STRATEGIES["badge"], SetStrategy)


@pytest.mark.parametrize("name", ["margin", "least-confidence"])
def test_near_tie_beats_confident(name):
    rows = [[255, 0, 0],  # confident
            [255, 250, 0],  # near-tie between classes 0 and 1
            [0, 0, 255],  # confident
            [200, 100, 0]]  # in between
    pos, scores = _pointwise(name, _identity_backbone(3), _images(rows), k=4, batch_size=3)
    assert pos[:2] == [1, 3]
    assert scores[0] > scores[1] > scores[2]


def test_margin_and_least_confidence_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=1)
    out = type("Out", (), {"logits": logits})()
    margin = STRATEGIES["margin"]().score(out)
    lc = STRATEGIES["least-confidence"]().score(out)
    torch.testing.assert_close(margin, torch.stack([-(p[0, 0] - p[0, 1]), torch.tensor(0.0)]))
    torch.testing.assert_close(lc, torch.stack([1 - p[0, 0], torch.tensor(2 / 3)]))


def test_margin_ranks_two_way_tie_above_three_way_spread_least_confidence_the_reverse():
    # Three-way uniform: max p = 1/3 (least confident) but top-1 minus top-2 is 0, as for the
    # two-way tie: margin ties them (earlier first), least-confidence prefers the uniform one.
    rows = [[255, 255, 0], [255, 255, 255], [255, 0, 0]]
    margin_pos, _ = _pointwise("margin", _identity_backbone(3), _images(rows), k=3)
    lc_pos, _ = _pointwise("least-confidence", _identity_backbone(3), _images(rows), k=3)
    assert margin_pos == [0, 1, 2]
    assert lc_pos == [1, 0, 2]


# --- bald -----------------------------------------------------------------------------------

def _voting_backbone() -> FeatureBackbone:
    """8 features, 2 classes: features 0-3 vote for class 0, 4-7 for class 1."""
    w = torch.zeros(2, 8)
    w[0, :4] = 6.0
    w[1, 4:] = 6.0
    return FeatureBackbone(w)


BALD_ROWS = [
    [255, 255, 255, 255, 0, 0, 0, 0],  # agree: four features for class 0, dropout rarely flips it
    [255, 0, 0, 0, 255, 0, 0, 0],  # disagree: one feature each way, each pass follows what survives
    [0] * 8,  # uniform every pass: maximal entropy but nothing to disagree about
    [0, 0, 0, 0, 255, 255, 255, 255],  # agree on class 1
    [0, 255, 0, 0, 0, 0, 255, 0],  # disagree
]


def test_bald_prefers_disagreeing_passes_over_agreeing_or_uniformly_unsure():
    pos, scores = _pointwise("bald", _voting_backbone(), _images(BALD_ROWS), k=5, passes=64)
    assert set(pos[:2]) == {1, 4}
    assert pos[-1] == 2  # uniform in every pass: mutual information exactly 0
    assert scores[-1] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] > 2 * max(scores[2], scores[3])
    # the backbone's entropy ties the uniform sample with the disagreeing ones (all at ln 2)
    entropy_pos, entropy_scores = _pointwise("entropy", _voting_backbone(), _images(BALD_ROWS), k=3)
    assert entropy_pos == [1, 2, 4]
    torch.testing.assert_close(entropy_scores, torch.full((3,), float(np.log(2))))


def test_bald_same_seed_same_scores_whatever_the_batch_size():
    images = _images(BALD_ROWS * 3)
    ref_pos, ref_scores = _pointwise("bald", _voting_backbone(), images, k=15, seed=5)
    for batch_size in (1, 4, 7):
        pos, scores = _pointwise("bald", _voting_backbone(), images, k=15, batch_size=batch_size, seed=5)
        assert pos == ref_pos
        torch.testing.assert_close(scores, ref_scores)
    _, other = _pointwise("bald", _voting_backbone(), images, k=15, seed=6)
    assert not torch.equal(other, ref_scores)


def test_bald_from_params_reads_its_keys():
    params = load_params(None, ["strategy=bald", "bald_passes=3", "bald_dropout=0.25"])
    strategy = build_strategy("bald", seed=1, params=params)
    assert (strategy.passes, strategy.dropout) == (3, 0.25)


def test_bald_on_small_cnn_keeps_batchnorm_in_eval_and_scores_are_mutual_information():
    torch.manual_seed(0)
    backbone = build_backbone("small-cnn", 1, 4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8)
    pos, scores = top_k_uncertain(backbone, None, images, build_strategy("bald"), 9, CPU, batch_size=4)
    assert sorted(pos.tolist()) == list(range(9))
    assert not backbone.training
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched
    assert (scores >= 0).all() and scores.max() > 0
    assert scores.max() <= np.log(4) + 1e-5


def test_small_cnn_dropout_default_is_no_layer_and_eval_ignores_it():
    torch.manual_seed(0)
    plain = build_backbone("small-cnn", 1, 4)
    torch.manual_seed(0)
    dropped = build_backbone("small-cnn", 1, 4, dropout=0.5)
    assert isinstance(plain.dropout, nn.Identity)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    x = torch.randn(6, 1, 8, 8)
    plain.eval()
    dropped.eval()
    logits, features = plain(x)
    torch.testing.assert_close(dropped(x)[0], logits)
    torch.testing.assert_close(logits, plain.head(features[-1].mean(dim=(2, 3))))
    dropped.train()
    a, b = dropped(x)[0], dropped(x)[0]
    assert not torch.equal(a, b)


# --- coreset --------------------------------------------------------------------------------

def _emb(features, logits=None) -> Embeddings:
    f = torch.tensor(features, dtype=torch.float32)
    if f.dim() == 1:
        f = f[:, None]
    return Embeddings(logits=logits if logits is not None else torch.zeros(len(f), 2), features=f)


def test_coreset_1d_greedy_order_from_labeled_centers():
    cand = _emb([1.0, 2.0, 10.0, 4.0, 7.0])
    pos, dist = STRATEGIES["coreset"]().select(cand, _emb([0.0]), k=5)
    assert pos.tolist() == [2, 3, 4, 1, 0]  # 10 (d 10), 4 (d 4), 7 (d 3), 2 (d 2), 1 (d 1)
    torch.testing.assert_close(dist, torch.tensor([10.0, 4.0, 3.0, 2.0, 1.0]))


def test_coreset_1d_without_labeled_starts_farthest_from_the_mean():
    pos, dist = STRATEGIES["coreset"]().select(_emb([0.0, 1.0, 5.0, 9.0, 10.0]), None, k=5)
    # mean 5: 0 and 10 tie, earlier first; then 10 (d 10); then 5 (d 5); 1 and 9 tie (d 1)
    assert pos.tolist() == [0, 4, 2, 1, 3]
    torch.testing.assert_close(dist, torch.tensor([5.0, 10.0, 5.0, 1.0, 1.0]))


def test_coreset_picks_the_cluster_far_from_labeled_first():
    g = torch.Generator().manual_seed(0)
    near = torch.randn(30, 4, generator=g) * 0.1  # around the labeled centers
    far = torch.randn(5, 4, generator=g) * 0.1 + 20.0
    x = torch.cat([near[:15], far[:3], near[15:], far[3:]])
    far_pos = {15, 16, 17, 33, 34}
    labeled = Embeddings(logits=torch.zeros(4, 2), features=torch.randn(4, 4, generator=g) * 0.1)
    pos, dist = STRATEGIES["coreset"]().select(Embeddings(torch.zeros(35, 2), x), labeled, k=6)
    assert pos[0].item() in far_pos
    assert len(set(pos.tolist())) == 6
    assert all(dist[i] >= dist[i + 1] for i in range(5))  # k-center distances never grow


def test_coreset_chunking_and_duplicates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    x[100:] = x[:100]  # every candidate twice
    centers = torch.randn(50, 8, generator=g)
    ref_pos, ref_dist = k_center_greedy(x, centers, k=200)
    pos, dist = k_center_greedy(x, centers, k=200, chunk_elements=7 * 200)  # 7 centers per chunk
    assert pos.tolist() == ref_pos.tolist()
    torch.testing.assert_close(dist, ref_dist)
    assert sorted(pos.tolist()) == list(range(200))  # all of them, each once
    assert dist[-100:].eq(0).all()  # the second copies come last, at distance 0


def test_coreset_5000_candidates_never_allocates_n_by_n(monkeypatch):
    def no_cdist(*args, **kwargs):
        raise AssertionError("coreset must not build a pairwise distance matrix")

    monkeypatch.setattr(torch, "cdist", no_cdist)
    g = torch.Generator().manual_seed(2)
    n, d = 5000, 64
    cand = Embeddings(logits=torch.zeros(n, 2), features=torch.randn(n, d, generator=g))
    labeled = Embeddings(logits=torch.zeros(1500, 2), features=torch.randn(1500, d, generator=g))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pos, _ = STRATEGIES["coreset"]().select(cand, labeled, k=10)
    assert len(set(pos.tolist())) == 10
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < largest < n * n * 4 / 4, f"largest allocation {largest} bytes"


# --- badge ----------------------------------------------------------------------------------

def test_badge_factorized_distance_matches_explicit_gradient_embeddings():
    g = torch.Generator().manual_seed(3)
    logits, features = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
    a, h = gradient_embedding_factors(logits, features)
    p = torch.softmax(logits, dim=1)
    explicit = (p - torch.eye(5)[p.argmax(1)])[:, :, None] * features[:, None, :]  # N×C×D
    explicit = explicit.flatten(1)
    pos, weights = kmeans_pp_seeding(a, h, k=3, generator=torch.Generator().manual_seed(0))
    assert pos[0] == explicit.norm(dim=1).argmax()
    torch.testing.assert_close(weights[0], explicit[pos[0]].pow(2).sum())
    d2 = (explicit - explicit[pos[0]]).pow(2).sum(1)
    torch.testing.assert_close(weights[1], d2[pos[1]], rtol=1e-4, atol=1e-5)


def _badge_groups():
    """Four groups of identical gradient embeddings (three uncertain, one confident), 5 copies each."""
    logits = torch.tensor([[0.0, 0.0, -5.0], [0.0, -5.0, 0.0], [-5.0, 0.0, 0.0], [12.0, 0.0, 0.0]])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    group = torch.arange(4).repeat(5)  # 0,1,2,3,0,1,2,3,...
    return Embeddings(logits=logits[group], features=features[group]), group


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_badge_covers_each_group_once_and_never_repeats(seed):
    cand, group = _badge_groups()
    pos, weights = STRATEGIES["badge"](seed=seed).select(cand, None, k=4)
    assert sorted(group[pos].tolist()) == [0, 1, 2, 3]
    assert (weights > 0).all()
    everything, _ = STRATEGIES["badge"](seed=seed).select(cand, None, k=20)
    assert sorted(everything.tolist()) == list(range(20))  # duplicates still picked once each


def test_badge_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(4)
    cand = Embeddings(logits=torch.randn(300, 10, generator=g), features=torch.randn(300, 16, generator=g))
    a, wa = STRATEGIES["badge"](seed=7).select(cand, None, k=25)
    b, wb = STRATEGIES["badge"](seed=7).select(cand, None, k=25)
    c, _ = STRATEGIES["badge"](seed=8).select(cand, None, k=25)
    assert a.tolist() == b.tolist() and torch.equal(wa, wb)
    assert a.tolist() != c.tolist()
    assert a[0] == c[0]  # the first center is the largest gradient, whatever the seed
    assert len(set(a.tolist())) == 25


@pytest.mark.parametrize("name", ["coreset", "badge"])
def test_set_strategies_through_select_candidates(name):
    backbone = _identity_backbone(3)
    images = _images([[255, 0, 0]] * 6 + [[0, 255, 0], [0, 0, 255], [255, 255, 0]])
    labeled = _images([[255, 0, 0]])
    strategy = build_strategy(name, seed=0)
    pos, scores = select_candidates(backbone, None, images, strategy, 3, CPU, batch_size=2, labeled_u8=labeled)
    if name == "coreset":  # the odd ones out, never a copy of the labeled one
        assert sorted(pos.tolist()) == [6, 7, 8]
    else:  # badge ignores the labeled set: three different embeddings, at most one of the copies
        assert len(set(pos.tolist())) == 3 and len([p for p in pos.tolist() if p < 6]) <= 1
    assert len(scores) == 3
    with pytest.raises(TypeError, match=name):
        top_k_uncertain(backbone, None, images, strategy, 3, CPU)


# --- every strategy through the pipeline ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_selects_budget_new_pool_ids_through_the_pipeline(name, tmp_path, data_root):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}",
                                f"strategy={name}", "tracking=false", "train.epochs=1", "bald_passes=3"])
    prepared = prepare_data(params)
    state = start_experiment(params, prepared["data_version"])
    trained = pipeline.train_step(params, 0)
    scores_path = pipeline.score_step(params, 0, trained["checkpoint"])
    ids = pipeline.select_step(scores_path, params["budget"])
    pool = set(inputs.dataset_for(params).pool_ids)
    assert len(ids) == params["budget"] == len(set(ids))
    assert not set(ids) & set(state["labeled"])
    assert set(ids) <= pool


@pytest.mark.parametrize("override, key", [("bald_passes=0", "bald_passes"), ("bald_dropout=0", "bald_dropout"),
                                           ("dropout=1.0", "dropout")])
def test_new_params_keys_are_validated(override, key):
    from tidal.config import ConfigError
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_params(None, [override])
    defaults = load_params(None, [])
    assert (defaults["dropout"], defaults["bald_passes"], defaults["bald_dropout"]) == (0.0, 10, 0.5)
