"""cifar-cnn: stage shapes on CIFAR and digits inputs, the TD module on its stages, learning."""
from __future__ import annotations

import pytest
import torch

from tidal.data import load_dataset
from tidal.evaluate import accuracy
from tidal.models import BACKBONES, TDPredictor, build_backbone
from tidal.train import TrainConfig, train_cycle

CPU = torch.device("cpu")


def test_cifar_cnn_pools_before_every_stage():
    torch.manual_seed(0)
    model = build_backbone("cifar-cnn", in_channels=3, num_classes=10)
    assert "cifar-cnn" in BACKBONES
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert model.stage_channels == [32, 64, 128]
    # only the stem runs at 32×32: the stages at 16, 8 and 4 pixels (the point of the design)
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7  # stem + 3 stages × 2


def test_cifar_cnn_runs_on_8x8_digits_and_feeds_the_td_module():
    model = build_backbone("cifar-cnn", in_channels=1, num_classes=10, dropout=0.3)
    logits, features = model(torch.randn(4, 1, 8, 8))
    assert [f.shape[-1] for f in features] == [4, 2, 1]
    td = TDPredictor(model.stage_channels, 10)
    assert td(features).shape == (4, 10)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.3


def test_cifar_cnn_learns_digits(data_root):
    data = load_dataset(data_root, "digits")
    torch.manual_seed(0)
    model = build_backbone("cifar-cnn", in_channels=1, num_classes=10)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[],
                      td_weight=1.0, crop_pad=1, hflip=False, schedule="onecycle", min_steps=120)
    history = train_cycle(model, None, data.pool_images[:300], data.pool_labels[:300], cfg, CPU, seed=0)
    assert len(history) == 24  # 5 steps an epoch: min_steps raised 4 epochs to 24
    acc = accuracy(model, data.test_images, data.test_labels, CPU)
    assert acc > 0.7, f"test accuracy {acc:.3f}"


@pytest.mark.parametrize("name", ["small-cnn", "cifar-cnn"])
def test_dropout_key_reaches_the_backbones_that_take_it(name):
    model = build_backbone(name, in_channels=3, num_classes=10, dropout=0.2)
    assert model.dropout.p == 0.2
