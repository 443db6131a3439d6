"""The pieces of data-parallel training that need no processes: sharding, the TD recorder's
combine across ranks, and the error a failed torchrun run turns into."""
from __future__ import annotations

import pytest
import torch

from tidal.dynamics import TDRecorder
from tidal.train import DistributedContext, TrainingDiverged
from tidal.launch import DistributedTrainingFailed, _failure


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_batch_once_and_keep_ranking_pairs_together(world):
    for n in range(2, 41):
        shards = [DistributedContext(r, world).shard(n) for r in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(n))  # disjoint, and all of it
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 2  # a pair more at most, and balanced otherwise
        half = n // 2
        for s in shards:
            # loss_ranking_loss pairs local i with local i + len//2: the same pair as in the global batch
            h = len(s) // 2
            assert torch.equal(s[:h] + half, s[h:2 * h])
    # Where pairs allow, this is idx[r::world] (the DistributedSampler-like split).
    assert DistributedContext(1, 2).shard(32).tolist() == list(range(1, 32, 2))


def _probs(n: int, c: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=gen) * 3, dim=1)


def test_combined_recorders_equal_one_recorder_bit_for_bit():
    n, c, world = 37, 6, 3
    gen = torch.Generator().manual_seed(0)
    one = TDRecorder(n, c)
    ranks = [TDRecorder(n, c) for _ in range(world)]
    for epoch in range(5):
        probs = _probs(n, c, gen)
        order = torch.randperm(n, generator=gen)[: n - epoch]  # some samples skip an epoch (dropped tail)
        for batch in order.split(8):
            target = one.update(batch, probs[batch])
            for r, rec in enumerate(ranks):
                local = batch[DistributedContext(r, world).shard(len(batch))]
                # Within the epoch each rank's target already includes every earlier epoch.
                got = rec.update(local, probs[local])
                assert torch.equal(got, target[DistributedContext(r, world).shard(len(batch))])
        total = sum(rec.contribution() for rec in ranks)  # what all_reduce(SUM) computes
        for rec in ranks:
            rec.apply(total.clone())
        for rec in ranks:
            assert torch.equal(rec.mean, one.mean) and torch.equal(rec.count, one.count), f"epoch {epoch}"


def test_combine_uses_the_given_all_reduce():
    rec = TDRecorder(4, 2)
    rec.update(torch.tensor([1, 2]), torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    other = TDRecorder(4, 2)
    other.update(torch.tensor([3]), torch.tensor([[0.5, 0.5]]))
    rec.combine(lambda t: t.add_(other.contribution()))
    assert rec.mean.tolist() == [[0, 0], [0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]
    assert rec.count.tolist() == [0, 1, 1, 1]
    assert not rec.touched.any()


def test_a_sample_updated_on_two_ranks_is_an_error():
    a, b = TDRecorder(3, 2), TDRecorder(3, 2)
    probs = torch.tensor([[0.5, 0.5]])
    a.update(torch.tensor([1]), probs)
    b.update(torch.tensor([1]), probs)
    with pytest.raises(RuntimeError, match="more than one process"):
        a.apply(a.contribution() + b.contribution())


TORCHRUN_SUMMARY = """\
[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1926: Connection reset by peer.
============================================================
tidal.train_ddp FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 27167)  (SIGTERM)
  traceback : Traceback (most recent call last):
  RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 27168)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 27168
============================================================
"""


def test_failure_names_the_root_cause_rank_and_exit_code():
    err = _failure(2, 1, TORCHRUN_SUMMARY)
    assert isinstance(err, DistributedTrainingFailed)
    msg = str(err)
    assert msg.startswith("distributed training of cycle 2 failed: rank 1 failed with exit code -9 (SIGKILL) "
                          "(torchrun exit code 1)")
    assert "Signal 9 (SIGKILL) received" in msg  # the output's tail follows


# torchrun's summary when a peer's failed collective was observed before the SIGKILLed rank (seen
# in `make test`: GlobalBatchNorm's forward all_reduce fails at once on the surviving rank).
PEER_OBSERVED_FIRST = """\
============================================================
tidal.train_ddp FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_04:22:28
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 21998)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 21998
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_04:22:28
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 21997)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_a_killed_rank_is_blamed_even_when_a_peer_failed_first():
    msg = str(_failure(0, 1, PEER_OBSERVED_FIRST))
    assert msg.startswith("distributed training of cycle 0 failed: rank 1 failed with exit code -9 (SIGKILL) ")


def test_without_a_killed_rank_torchruns_root_cause_stands():
    timed_out = PEER_OBSERVED_FIRST.replace("-9 (pid: 21998)  (SIGKILL)", "-15 (pid: 21998)  (SIGTERM)")
    assert str(_failure(0, 1, timed_out)).startswith("distributed training of cycle 0 failed: rank 0 failed with "
                                                     "exit code 1 ")


def test_failure_of_a_diverged_run_is_training_diverged():
    out = "[rank0]: tidal.train.TrainingDiverged: training loss became nan at epoch 2; lower train.lr\n"
    err = _failure(0, 1, out + TORCHRUN_SUMMARY)
    assert isinstance(err, TrainingDiverged)
    assert str(err) == "training loss became nan at epoch 2; lower train.lr"


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank (its all_reduce is the identity)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_global_batchnorm_is_batchnorm_on_one_rank(one_rank_group):
    """Forward, input and parameter gradients and running statistics equal nn.BatchNorm2d's."""
    from torch import nn

    from tidal.train import GlobalBatchNorm2d, global_batchnorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 5, 5, generator=gen) * 3 + 7).requires_grad_()  # a large mean: two-pass variance
    plain = nn.BatchNorm2d(4)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5, generator=gen)
        plain.bias.uniform_(-1, 1, generator=gen)
    net = nn.Sequential(nn.Identity(), nn.BatchNorm2d(4))
    net[1].load_state_dict(plain.state_dict())
    global_batchnorm(net)
    assert type(net[1]) is GlobalBatchNorm2d and set(net.state_dict()) == {f"1.{k}" for k in plain.state_dict()}
    upstream = torch.randn(16, 4, 5, 5, generator=gen)
    grads = []
    for module in (plain, net):
        x.grad = None
        out = module(x)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad.clone(), module.state_dict()))
    (out_a, dx_a, state_a), (out_b, dx_b, state_b) = grads
    terms = x[:, 0].numel()  # each per-channel sum adds 16 × 5 × 5 values

    def close(actual: torch.Tensor, expected: torch.Tensor, sums: int) -> None:
        """Within float32 rounding: the two layers add the same values in other orders. A float32
        sum of K terms in any order is within (K-1)·u·Σ|x_i| of the exact sum, u = 2^-24 (Higham,
        Accuracy and Stability of Numerical Algorithms, §4.2), so two orders differ by less than
        2·K·u of the sum's size (terms mostly of one sign), and to first order these relative
        differences add along the `sums` reordered sums a value depends on."""
        bound = 2 * 2.0 ** -24 * sums * terms * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, atol=bound, rtol=0)

    # The output: the mean and variance sums; the input gradient: those and the backward's sums of
    # dy and dy·x̂; the parameter gradients: mean, variance and their own sum; running statistics:
    # the mean (the variance also through it).
    close(out_b, out_a, 2)
    close(dx_b, dx_a, 4)
    for key, value in state_a.items():
        close(state_b[f"1.{key}"], value, 2)
    close(net[1].weight.grad, plain.weight.grad, 3)
    close(net[1].bias.grad, plain.bias.grad, 3)
    net.eval()
    plain.eval()
    net[1].load_state_dict(plain.state_dict())
    assert torch.equal(net(x), plain(x))  # evaluation: plain BatchNorm, the same operation on the same statistics
