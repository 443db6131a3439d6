"""tidal.dynamics.TDRecorder: the running mean of each sample's softmax over epochs."""
from __future__ import annotations

import numpy as np
import torch

from tidal.dynamics import TDRecorder

N, C = 23, 5


def _epoch_probs(rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(scale=3.0, size=(N, C))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _feed_epoch(rec: TDRecorder, probs: np.ndarray, order: np.ndarray, batch_size: int) -> dict[int, np.ndarray]:
    """Feed one epoch in shuffled batches; return the p̄ the recorder handed back per index."""
    returned = {}
    for start in range(0, len(order), batch_size):
        idx = torch.from_numpy(order[start:start + batch_size]).long()
        out = rec.update(idx, torch.from_numpy(probs[idx.numpy()]))
        for i, row in zip(idx.tolist(), out):
            returned[i] = row.numpy().copy()
    return returned


def test_equals_running_mean_over_shuffled_epochs():
    rng = np.random.default_rng(0)
    rec = TDRecorder(N, C)
    seen = []
    for epoch in range(6):
        probs = _epoch_probs(rng)
        seen.append(probs)
        order = rng.permutation(N)
        returned = _feed_epoch(rec, probs, order, batch_size=4 + epoch)
        expected = np.mean(np.stack(seen), axis=0)  # float64 reference
        np.testing.assert_allclose(rec.mean.numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(rec.count.numpy(), np.full(N, epoch + 1))
        # update() returns p̄ for exactly the indices it was given (the training target)
        for i, row in returned.items():
            np.testing.assert_allclose(row, expected[i], rtol=0, atol=1e-6)
        # rows stay probability distributions
        np.testing.assert_allclose(rec.mean.sum(1).numpy(), np.ones(N), atol=1e-5)


def test_matches_torch_mean_reference():
    torch.manual_seed(0)
    rec = TDRecorder(N, C)
    history = []
    for _ in range(4):
        probs = torch.softmax(torch.randn(N, C) * 2, dim=1)
        history.append(probs)
        perm = torch.randperm(N)
        for idx in perm.split(7):
            rec.update(idx, probs[idx])
    torch.testing.assert_close(rec.mean, torch.stack(history).mean(0), rtol=0, atol=1e-6)


def test_skipped_samples_keep_their_own_count():
    rng = np.random.default_rng(1)
    rec = TDRecorder(N, C)
    per_sample: list[list[np.ndarray]] = [[] for _ in range(N)]
    skip_plan = [set(), {0, 3}, {3, 7, 22}, set(range(0, N, 2)), {5}]
    for skipped in skip_plan:
        probs = _epoch_probs(rng)
        fed = np.array([i for i in rng.permutation(N) if i not in skipped])
        _feed_epoch(rec, probs, fed, batch_size=6)
        for i in fed:
            per_sample[i].append(probs[i])
    counts = np.array([len(h) for h in per_sample])
    assert len(set(counts.tolist())) > 1, "the plan must give samples different counts"
    np.testing.assert_array_equal(rec.count.numpy(), counts)
    expected = np.stack([np.mean(h, axis=0) for h in per_sample])
    np.testing.assert_allclose(rec.mean.numpy(), expected, rtol=0, atol=1e-6)


def test_never_seen_sample_stays_zero_and_reset_clears():
    rec = TDRecorder(4, 3)
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    rec.update(torch.tensor([0, 2]), probs)
    assert torch.equal(rec.mean[1], torch.zeros(3))
    assert rec.count.tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(rec.mean[2], probs[1])
    rec.reset()
    assert torch.count_nonzero(rec.mean) == 0
    assert torch.count_nonzero(rec.count) == 0
    # after a reset the mean restarts (p̄ is reset at the start of each cycle's training)
    rec.update(torch.tensor([0]), probs[1:])
    torch.testing.assert_close(rec.mean[0], probs[1])


def test_update_detaches_its_input():
    rec = TDRecorder(3, 2)
    logits = torch.randn(3, 2, requires_grad=True)
    out = rec.update(torch.arange(3), torch.softmax(logits, dim=1))
    assert not out.requires_grad
    assert not rec.mean.requires_grad


def test_a_float64_recorder_keeps_float64():
    """A float64 model's p̄ (tests/model/test_td_reference.py) is not rounded to float32, and the
    end-of-epoch merge (run in one process too) keeps it."""
    rec = TDRecorder(3, 2, dtype=torch.float64)
    p = torch.tensor([[1 / 3, 2 / 3], [0.1, 0.9], [0.7, 0.3]], dtype=torch.float64)
    out = rec.update(torch.arange(3), p)
    assert out.dtype == rec.mean.dtype == torch.float64 and torch.equal(out, p)  # first visit: p̄ = p exactly
    rec.combine(lambda total: None)  # one process: nothing to sum
    assert torch.equal(rec.mean, p) and torch.equal(rec.count, torch.ones(3, dtype=torch.float64))
