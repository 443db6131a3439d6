"""Learning Loss (lloss): the ranking loss on hand-built numbers, the stop-gradient epoch, the
strategy's choice, the checkpoint; and the CPU side of the GPU training helpers."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tidal import pipeline
from tidal.config import PRESETS, ConfigError, load_params
from tidal.data import materialize
from tidal.experiment import prepare_data, start_experiment
from tidal.models import LossPredictor, build_backbone, loss_ranking_loss
from tidal.scoring import top_k_uncertain
from tidal.strategies import STRATEGIES, ModelOutput, build_strategy
from tidal.train import (LossPredTask, TrainConfig, aux_task, precision_context, prepare_input, prepare_model,
                         train_cycle)

CPU = torch.device("cpu")
# true per-sample losses; pairs (0, 2) with l0 > l2 (sign +1) and (1, 3) with l1 < l3 (sign -1)
TRUE = torch.tensor([2.0, 0.1, 1.0, 0.5])


# --- the ranking loss -----------------------------------------------------------------------

def test_ranking_loss_zero_when_order_matches_by_more_than_the_margin():
    pred = torch.tensor([3.0, 0.0, 1.5, 1.2])  # p0 - p2 = 1.5 > 1, p3 - p1 = 1.2 > 1
    assert loss_ranking_loss(pred, TRUE, margin=1.0).item() == 0.0


def test_ranking_loss_positive_when_order_reversed():
    pred = torch.tensor([1.5, 1.2, 3.0, 0.0])  # both pairs the wrong way round
    # pair (0, 2): 1 - (1.5 - 3.0) = 2.5; pair (1, 3): 1 + (1.2 - 0.0) = 2.2; mean over pairs
    assert loss_ranking_loss(pred, TRUE, margin=1.0).item() == pytest.approx(2.35)


def test_ranking_loss_inside_the_margin_odd_batch_and_ties():
    # right order but only 0.5 apart: 1 - 0.5 = 0.5 per pair; the odd fifth sample is left out
    pred = torch.tensor([1.0, 0.0, 0.5, 0.5, 100.0])
    true = torch.cat([TRUE, torch.tensor([-7.0])])
    assert loss_ranking_loss(pred, true).item() == pytest.approx(0.5)
    # a tie in the true losses counts as "not larger" (sign -1), as in the reference code
    assert loss_ranking_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(1.0)
    assert loss_ranking_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == 0.0  # no pair


def test_ranking_loss_does_not_backpropagate_into_the_true_losses():
    true = TRUE.clone().requires_grad_()
    pred = torch.tensor([1.5, 1.2, 3.0, 0.0], requires_grad=True)
    loss_ranking_loss(pred, true).backward()
    assert true.grad is None and pred.grad is not None


# --- the stop-gradient epoch ----------------------------------------------------------------

def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[5],
                td_weight=1.0, crop_pad=0, hflip=False)
    base.update(kw)
    return TrainConfig(**base)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone("small-cnn", 1, 3)
    return backbone, LossPredictor(backbone.stage_channels)


@pytest.mark.parametrize("epoch, reaches_backbone", [(1, True), (2, True), (3, False), (4, False)])
def test_detach_after_the_configured_epoch_stops_the_gradient_into_the_backbone(epoch, reaches_backbone):
    backbone, module = _models()
    task = aux_task(module, _cfg(lloss_detach_epoch=2))
    assert isinstance(task, LossPredTask)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, features = backbone(x)
    task.loss(task.forward(features, epoch), torch.arange(6), logits, y).backward()  # the module's loss only
    backbone_grads = [p.grad for p in backbone.parameters()]
    if reaches_backbone:
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    else:
        assert all(g is None for g in backbone_grads)
    assert all(p.grad is not None for p in module.parameters())  # the module itself keeps learning


def test_lloss_weight_moves_the_backbone_only_before_the_detach_epoch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (32,), generator=g)

    def backbone_after(weight: float, detach_epoch: int) -> torch.Tensor:
        backbone, module = _models()
        history = train_cycle(backbone, module, images, labels,
                              _cfg(lloss_weight=weight, lloss_detach_epoch=detach_epoch), CPU, seed=0)
        assert history[0]["lloss_rank"] > 0 and history[0]["td_kl"] == 0.0
        return torch.cat([p.detach().flatten() for p in backbone.parameters()])

    assert not torch.equal(backbone_after(0.0, 10), backbone_after(1.0, 10))  # joint: it trains the backbone
    assert torch.equal(backbone_after(0.0, 0), backbone_after(1.0, 0))  # detached from epoch 1: it does not


# --- the strategy ---------------------------------------------------------------------------

class PixelBackbone(nn.Module):
    """One feature stage: the normalized image itself; constant logits."""

    def forward(self, x):
        return torch.zeros(len(x), 2), [x]


class MeanLoss(nn.Module):
    """Predicted loss = the image's mean normalized pixel."""

    def forward(self, features):
        return features[0].mean(dim=(1, 2, 3))


def test_lloss_picks_the_highest_predicted_losses():
    assert STRATEGIES["lloss"].aux == "loss"
    strategy = build_strategy("lloss")
    torch.testing.assert_close(strategy.score(ModelOutput(logits=torch.zeros(3, 2),
                                                          pred_loss=torch.tensor([0.1, 2.0, -1.0]))),
                               torch.tensor([0.1, 2.0, -1.0]))
    pixels = [10, 250, 0, 200, 120, 251]
    images = torch.tensor(pixels, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    pos, scores = top_k_uncertain(PixelBackbone(), MeanLoss(), images, strategy, 3, CPU, batch_size=4)
    assert pos.tolist() == [5, 1, 3]
    assert scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="loss prediction module"):
        top_k_uncertain(PixelBackbone(), None, images, strategy, 3, CPU)


def test_lloss_checkpoint_round_trip(tmp_path):
    data_root = tmp_path / "data"
    materialize(data_root, "digits")
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={data_root}",
                                "strategy=lloss", "tracking=false", "train.epochs=1", "device=cpu"])
    start_experiment(params, prepare_data(params)["data_version"])
    trained = pipeline.train_step(params, 0)
    saved = torch.load(trained["checkpoint"], weights_only=True)
    assert saved["td_module"] is None and saved["lloss_module"] is not None
    backbone, module = pipeline.load_models(params, trained["checkpoint"])
    assert isinstance(module, LossPredictor)
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved["lloss_module"][k])


# --- config ---------------------------------------------------------------------------------

def test_lloss_and_compile_keys():
    params = load_params(None, [])
    train = params["train"]
    assert (train["lloss_weight"], train["lloss_detach_epoch"], train["compile"]) == (1.0, 24, False)
    assert load_params(None, ["train.compile=reduce-overhead"])["train"]["compile"] == "reduce-overhead"
    for bad in ("train.compile=true", "train.compile=fast", "train.lloss_weight=-1",
                "train.lloss_detach_epoch=-1", "train.lloss_detach_epoch=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_params(None, [bad])
    with pytest.raises(ConfigError, match="train.compile.*CUDA"):
        load_params(None, ["device=cpu", "train.compile=default"])


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_every_preset_detaches_lloss_at_the_papers_ratio(preset):
    # The paper detaches the loss module after 120 of 200 epochs: the last 40 % of training.
    train = load_params(None, [f"preset={preset}"] if preset else [])["train"]
    assert train["lloss_detach_epoch"] == round(0.6 * train["epochs"]), preset


def test_min_steps_scales_the_lloss_detach_epoch_with_the_epochs():
    train = load_params(None, ["preset=cpu-cifar10-500"])["train"]
    cfg = TrainConfig.from_params(train).for_labeled(500)  # 8 steps an epoch: 100 epochs for 800 steps
    assert cfg.epochs == 100 and cfg.lloss_detach_epoch == 60


# --- the GPU path's helpers, on CPU: the no-op path -----------------------------------------

def test_cpu_path_is_plain_fp32_without_compile():
    assert isinstance(precision_context(CPU), contextlib.nullcontext)
    x = torch.randn(2, 1, 8, 8)
    assert prepare_input(x, CPU) is x
    model = build_backbone("small-cnn", 1, 3)
    assert prepare_model(model, CPU) is model
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in model.parameters())


def test_compile_on_cpu_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="only supported on CUDA"):
        prepare_model(build_backbone("small-cnn", 1, 3), CPU, "default")
    backbone, module = _models()
    with pytest.raises(ValueError, match="train.compile"):
        train_cycle(backbone, module, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                    _cfg(compile="default"), CPU, seed=0)
