"""CIFAR-style ResNet-18: stage shapes, the TD module on its stages, gradient flow."""
from __future__ import annotations

import torch

from tidal.models import BACKBONES, TDPredictor, build_backbone
from tidal.train import td_kl_loss


def _model(num_classes: int = 10):
    torch.manual_seed(0)
    return build_backbone("resnet18", in_channels=3, num_classes=num_classes)


def test_resnet18_registered_with_cifar_stem():
    model = _model()
    assert "resnet18" in BACKBONES
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in model.stages] == [2, 2, 2, 2]
    # ResNet-18 for CIFAR has about 11.2M parameters
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_resnet18_stage_shapes_on_cifar_input():
    model = _model()
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert model.stage_channels == [64, 128, 256, 512]
    assert [tuple(f.shape) for f in features] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8),
                                                  (2, 512, 4, 4)]


def test_td_module_attaches_and_gradient_reaches_the_backbone():
    model = _model(num_classes=5)
    td = TDPredictor(model.stage_channels, num_classes=5)
    logits, features = model(torch.randn(2, 3, 32, 32))
    td_logits = td(features)
    assert td_logits.shape == (2, 5)
    target = torch.softmax(torch.randn(2, 5), dim=1)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])) + td_kl_loss(td_logits, target)
    loss.backward()
    assert all(p.grad is not None for p in td.parameters())
    # the TD loss alone reaches the stem through every stage (the reference never detaches)
    model.zero_grad()
    _, features = model(torch.randn(2, 3, 32, 32))
    td_kl_loss(td(features), target).backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0
