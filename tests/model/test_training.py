"""Training on real digits, bit-identical pipeline reruns on CPU, and divergence detection."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.data import load_dataset
from tidal.evaluate import accuracy
from tidal.experiment import load_state, prepare_data, start_experiment
from tidal.models import TDPredictor, build_backbone
from tidal.train import (ONECYCLE_START, TrainConfig, TrainingDiverged, epoch_batches, loss_precision, lr_factor,
                         steps_per_epoch, to_float, train_cycle)
from tidal.workspace import read_csv, read_json, workspace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(data_root):
    return load_dataset(data_root, "digits")


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[4],
                td_weight=1.0, crop_pad=1, hflip=False)
    base.update(kw)
    return TrainConfig(**base)


def _models(seed: int = 0, with_td: bool = True):
    torch.manual_seed(seed)
    backbone = build_backbone("small-cnn", 1, 10)
    td = TDPredictor(backbone.stage_channels, 10) if with_td else None
    return backbone, td


@pytest.mark.parametrize("with_td", [True, False])
def test_train_cycle_beats_chance(digits, with_td):
    backbone, td = _models(with_td=with_td)
    images, labels = digits.pool_images[:300], digits.pool_labels[:300]
    seen = []
    history = train_cycle(backbone, td, images, labels, _cfg(), CPU, seed=0, on_epoch=seen.append)
    assert [r["epoch"] for r in history] == list(range(1, 6))
    assert seen == history
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["lr"] == pytest.approx(0.005)  # ×0.1 at the milestone
    if with_td:
        assert all(r["td_kl"] > 0 for r in history)
    else:
        assert all(r["td_kl"] == 0 for r in history)
    acc = accuracy(backbone, digits.test_images, digits.test_labels, CPU)
    assert acc > 0.5, f"test accuracy {acc:.3f} is not above chance (0.1) by a margin"


def test_train_cycle_same_seed_same_weights(digits):
    images, labels = digits.pool_images[:64], digits.pool_labels[:64]
    results = []
    for seed in (0, 0, 1):
        backbone, td = _models(seed=0)
        train_cycle(backbone, td, images, labels, _cfg(epochs=2), CPU, seed=seed)
        results.append(torch.cat([p.detach().flatten() for p in backbone.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])  # the data order/augmentation seed matters


def test_td_loss_trains_the_backbone_too(digits):
    # The module's gradient flows into the backbone (the reference never detaches): with the KL
    # weight switched on, the backbone ends up with different weights than with it off.
    images, labels = digits.pool_images[:64], digits.pool_labels[:64]
    weights = {}
    for td_weight in (0.0, 1.0):
        backbone, td = _models(seed=0)
        train_cycle(backbone, td, images, labels, _cfg(epochs=1, td_weight=td_weight), CPU, seed=0)
        weights[td_weight] = backbone.stages[0][0].weight.detach().clone()
    assert not torch.equal(weights[0.0], weights[1.0])


def test_a_detached_td_module_learns_without_changing_the_backbone(digits):
    # train.td_detach: the module reads detached features, so the backbone trains exactly as it
    # does with no KL term at all, while the module itself still learns the targets.
    images, labels = digits.pool_images[:64], digits.pool_labels[:64]
    runs = {}
    for name, kw in {"no_kl": dict(td_weight=0.0), "detached": dict(td_detach=True)}.items():
        backbone, td = _models(seed=0)
        before = [p.detach().clone() for p in td.parameters()]
        history = train_cycle(backbone, td, images, labels, _cfg(epochs=2, **kw), CPU, seed=0)
        runs[name] = (backbone.stages[0][0].weight.detach().clone(), history)
        assert any(not torch.equal(a, b) for a, b in zip(before, td.parameters()))
    assert torch.equal(runs["no_kl"][0], runs["detached"][0])
    assert all(r["td_kl"] > 0 for r in runs["detached"][1])


def test_td_hidden_sets_the_modules_width(tmp_path, data_root):
    params = load_params(None, ["preset=debug", "strategy=tidal-entropy", f"data_root={data_root}",
                                f"runs_dir={tmp_path}", "train.td_hidden=32"])
    _, td = pipeline.build_models(params, load_dataset(data_root, "digits"))
    assert [b.out_features for b in td.branches] == [32] * len(td.branches)
    assert td.out.in_features == 32 * len(td.branches)


def test_huge_lr_raises_training_diverged(digits):
    backbone, td = _models()
    with pytest.raises(TrainingDiverged, match=r"epoch 1\b"):
        train_cycle(backbone, td, digits.pool_images[:96], digits.pool_labels[:96],
                    _cfg(epochs=3, lr=1e10), CPU, seed=0)


def test_nan_loss_raises_training_diverged_naming_the_epoch(digits, monkeypatch):
    n, batch_size = 64, 32  # two batches per epoch
    calls = {"n": 0}
    real_ce = F.cross_entropy

    def ce_nan_from_epoch_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 * (n // batch_size) else loss

    monkeypatch.setattr(F, "cross_entropy", ce_nan_from_epoch_3)
    backbone, td = _models()
    seen = []
    with pytest.raises(TrainingDiverged, match=r"epoch 3\b"):
        train_cycle(backbone, td, digits.pool_images[:n], digits.pool_labels[:n],
                    _cfg(epochs=5, batch_size=batch_size), CPU, seed=0, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2]  # the diverged epoch is never reported as done


# --- a training budget that fits the labeled set ---------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 64, 65, 100])
def test_steps_per_epoch_counts_the_batches_trained(n):
    perm = torch.arange(n)
    assert steps_per_epoch(n, 32) == len(epoch_batches(perm, 32))


def test_min_steps_raises_epochs_and_scales_the_schedule():
    cfg = _cfg(epochs=10, batch_size=32, milestones=[5, 8], lloss_detach_epoch=6, min_steps=200)
    planned = cfg.for_labeled(64)  # 2 steps an epoch: 100 epochs give the 200 steps
    assert planned.epochs == 100
    assert planned.milestones == [50, 80] and planned.lloss_detach_epoch == 60  # ×10, same shape
    assert planned.epochs * steps_per_epoch(64, 32) >= 200
    big = cfg.for_labeled(6400)  # 200 steps an epoch: the epochs already give more than min_steps
    assert big is cfg
    assert _cfg(epochs=10, min_steps=0).for_labeled(64).epochs == 10


def test_min_steps_trains_that_many_steps(digits, monkeypatch):
    steps = []
    real_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    backbone, _ = _models(with_td=False)
    history = train_cycle(backbone, None, digits.pool_images[:40], digits.pool_labels[:40],
                          _cfg(epochs=2, batch_size=16, min_steps=25), CPU, seed=0)
    assert len(history) == 9  # 3 steps an epoch (16, 16, 8): 9 epochs reach 25 steps
    assert len(steps) == 27


def test_multistep_factor_matches_torch_multisteplr():
    cfg = _cfg(epochs=6, milestones=[2, 4])
    factor = lr_factor(cfg, steps_per_epoch=3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for epoch in range(6):
        for step in range(3):
            assert 0.05 * factor(3 * epoch + step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_onecycle_rises_to_lr_then_falls_to_zero(digits):
    cfg = _cfg(epochs=10, schedule="onecycle")
    factor = lr_factor(cfg, steps_per_epoch=4)  # 40 steps, peak at step 10
    values = [factor(s) for s in range(40)]
    assert values[0] == pytest.approx(ONECYCLE_START)
    assert max(values) == pytest.approx(1.0) and values.index(1.0) == 10
    assert values[:11] == sorted(values[:11]) and values[10:] == sorted(values[10:], reverse=True)
    assert values[-1] == pytest.approx(1 / 30)  # the last step, one before 0
    backbone, _ = _models(with_td=False)
    history = train_cycle(backbone, None, digits.pool_images[:128], digits.pool_labels[:128], cfg, CPU, seed=0)
    lrs = [r["lr"] for r in history]
    assert lrs[-1] < 0.05 * cfg.lr and max(lrs) > 0.5 * cfg.lr  # annealed, after a high middle


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(_cfg(schedule="cosine"), 4)


def test_losses_raise_only_half_precision():
    """CUDA's bf16 autocast outputs go to the losses in float32; float32 as it is (the same tensor),
    float64 not rounded to float32 (tests/model/test_td_reference.py trains a float64 model)."""
    x = torch.tensor([1 / 3])
    assert loss_precision(x.bfloat16()).dtype == loss_precision(x.half()).dtype == torch.float32
    assert loss_precision(x) is x
    assert loss_precision(x.double()).dtype == torch.float64


def test_a_float64_model_reads_float64_images():
    """train_cycle brings uint8 images to the model's dtype: float32 by default, float64 computed
    as float64 (not a float32 input widened)."""
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    as32, as64 = to_float(images), to_float(images, torch.float64)
    assert as32.dtype == torch.float32 and as64.dtype == torch.float64
    assert torch.equal(as64, images.double() / 255)
    assert not torch.equal(as64, as32.double())  # 1/255 is not a float32


# --- the pipeline steps, twice with the same seed -------------------------------------------

def _run(tmp_path, name: str, strategy: str, data_root, seed: int = 0, cycles: int = 1):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/{name}", f"data_root={data_root}",
                                "device=cpu", f"strategy={strategy}", f"seed={seed}"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    ws = workspace(params)
    selections, score_files, weights = [], [], []
    for cycle in range(cycles):
        pipeline.run_cycle(params, cycle)
        scores_path = str(ws.cycle_dir(cycle) / "scores.csv")
        selections.append(pipeline.select_step(scores_path, params["budget"]))
        with open(scores_path, "rb") as fh:
            score_files.append(fh.read())
        weights.append(torch.load(ws.cycle_dir(cycle) / "model.pt", weights_only=True))
    return params, selections, score_files, weights


def _same_weights(a: dict, b: dict) -> bool:
    if (a["td_module"] is None) != (b["td_module"] is None):
        return False
    parts = ["backbone"] + (["td_module"] if a["td_module"] is not None else [])
    return all(torch.equal(a[p][k], b[p][k]) for p in parts for k in a[p])


def test_pipeline_rerun_is_bit_identical_tidal_entropy(tmp_path, data_root):
    params, sel_a, scores_a, w_a = _run(tmp_path, "a", "tidal-entropy", data_root, cycles=2)
    _, sel_b, scores_b, w_b = _run(tmp_path, "b", "tidal-entropy", data_root, cycles=2)
    assert sel_a == sel_b
    assert scores_a == scores_b  # the score files byte for byte
    assert all(_same_weights(x, y) for x, y in zip(w_a, w_b))
    for ids in sel_a:
        assert len(ids) == params["budget"] == len(set(ids))
    # the second cycle queried nothing it had already labeled, and learned from cycle 0's query
    state = load_state(params)
    assert state["cycle"] == 2
    assert not set(sel_a[1]) & set(sel_a[0])
    assert set(sel_a[0]) | set(sel_a[1]) <= set(state["labeled"])
    assert len(state["labeled"]) == params["initial_size"] + 2 * params["budget"]
    assert [h["n_labeled"] for h in state["history"]] == [params["initial_size"], params["initial_size"] + params["budget"]]


@pytest.mark.parametrize("strategy", ["tidal-margin", "entropy", "random"])
def test_pipeline_rerun_is_bit_identical_other_strategies(tmp_path, data_root, strategy):
    _, sel_a, scores_a, w_a = _run(tmp_path, "a", strategy, data_root)
    _, sel_b, scores_b, w_b = _run(tmp_path, "b", strategy, data_root)
    assert sel_a == sel_b
    assert scores_a == scores_b
    assert _same_weights(w_a[0], w_b[0])


def test_pipeline_different_seed_different_selection(tmp_path, data_root):
    _, sel_0, _, _ = _run(tmp_path, "s0", "tidal-entropy", data_root, seed=0)
    _, sel_1, _, _ = _run(tmp_path, "s1", "tidal-entropy", data_root, seed=1)
    assert sel_0 != sel_1


def test_pipeline_steps_resume_without_redoing_work(tmp_path, data_root):
    params, sel, _, _ = _run(tmp_path, "r", "tidal-entropy", data_root)
    ckpt = workspace(params).cycle_dir(0) / "model.pt"
    mtime = ckpt.stat().st_mtime_ns
    again = pipeline.train_step(params, 0)
    assert again["resumed"] is True
    assert ckpt.stat().st_mtime_ns == mtime
    scores_path = pipeline.score_step(params, 0, again["checkpoint"])
    assert pipeline.select_step(scores_path, params["budget"]) == sel[0]
    history = read_json(again["history"])
    assert [r["epoch"] for r in history] == list(range(1, params["train"]["epochs"] + 1))
    rows = read_csv(scores_path)
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_trains_cycle_one_from_cycle_zeros_models(tmp_path, data_root, monkeypatch, warm):
    """train.warm_start: cycle 1 starts from cycle 0's backbone and TD module (the reference code's
    way); off, it starts from the fresh seeded models it would build anyway."""
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}", "device=cpu",
                                "tracking=false", f"train.warm_start={str(warm).lower()}"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    pipeline.run_cycle(params, 0)
    started_from = []
    real = pipeline.train_cycle

    def recording(backbone, aux, *args, **kwargs):
        started_from.append(({k: v.clone() for k, v in backbone.state_dict().items()},
                             {k: v.clone() for k, v in aux.state_dict().items()}))
        return real(backbone, aux, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_cycle", recording)
    pipeline.train_step(params, 1)
    cycle0 = torch.load(workspace(params).cycle_dir(0) / "model.pt", weights_only=True)
    backbone, td_module = started_from[0]
    same = all(torch.equal(backbone[k], cycle0["backbone"][k]) for k in backbone)
    same_module = all(torch.equal(td_module[k], cycle0["td_module"][k]) for k in td_module)
    assert same is warm and same_module is warm
    if not warm:
        torch.manual_seed(pipeline.cycle_seed(params["seed"], 1))
        fresh, _ = pipeline.build_models(params, inputs.dataset_for(params))
        assert all(torch.equal(backbone[k], v) for k, v in fresh.state_dict().items())
