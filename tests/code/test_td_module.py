"""TDPredictor and the TiDAL KL loss."""
from __future__ import annotations

import torch

from tidal.models import TDPredictor, build_backbone
from tidal.train import td_kl_loss


def _backbone_and_td(num_classes: int = 10):
    torch.manual_seed(0)
    backbone = build_backbone("small-cnn", in_channels=1, num_classes=num_classes)
    td = TDPredictor(backbone.stage_channels, num_classes)
    return backbone, td


def test_backbone_exposes_one_feature_map_per_stage():
    backbone, _ = _backbone_and_td()
    logits, features = backbone(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 10)
    assert [f.shape[1] for f in features] == backbone.stage_channels


def test_td_predictor_output_shape():
    backbone, td = _backbone_and_td(num_classes=7)
    for size in (8, 16):
        _, features = backbone(torch.randn(5, 1, size, size))
        out = td(features)
        assert out.shape == (5, 7)
        assert torch.isfinite(out).all()


def test_td_predictor_shape_with_explicit_features():
    td = TDPredictor([4, 6], num_classes=3, hidden=16)
    out = td([torch.randn(2, 4, 5, 5), torch.randn(2, 6, 2, 2)])
    assert out.shape == (2, 3)
    # one hidden branch per stage, concatenated before the output layer
    assert td.out.in_features == 2 * 16


def test_kl_zero_when_module_softmax_equals_target():
    torch.manual_seed(1)
    td_logits = torch.randn(6, 10) * 3
    target = torch.softmax(td_logits, dim=1)
    loss = td_kl_loss(td_logits, target)
    assert loss.abs().item() < 1e-6


def test_kl_positive_otherwise_and_batchmean():
    torch.manual_seed(2)
    td_logits = torch.randn(6, 10)
    target = torch.softmax(torch.randn(6, 10) * 3, dim=1)
    loss = td_kl_loss(td_logits, target)
    assert loss.item() > 1e-3
    # KL(p̄ ‖ p̃) summed over classes, averaged over the batch
    p_tilde = torch.softmax(td_logits, dim=1)
    reference = (target * (target.log() - p_tilde.log())).sum(1).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_kl_direction_is_target_first():
    # KL(p̄ ‖ p̃) != KL(p̃ ‖ p̄) for these two distributions, so the direction is observable.
    p_bar = torch.tensor([[0.7, 0.2, 0.1]])
    p_tilde = torch.tensor([[0.1, 0.1, 0.8]])
    loss = td_kl_loss(p_tilde.log(), p_bar)
    forward = (p_bar * (p_bar / p_tilde).log()).sum()
    backward = (p_tilde * (p_tilde / p_bar).log()).sum()
    assert abs(forward - backward) > 0.1
    torch.testing.assert_close(loss, forward, rtol=1e-5, atol=1e-6)


def test_kl_target_gets_no_gradient():
    td_logits = torch.randn(4, 3, requires_grad=True)
    target_logits = torch.randn(4, 3, requires_grad=True)
    td_kl_loss(td_logits, torch.softmax(target_logits, dim=1)).backward()
    assert target_logits.grad is None
    assert td_logits.grad is not None and td_logits.grad.abs().sum() > 0


def test_kl_gradient_reaches_backbone_first_conv():
    backbone, td = _backbone_and_td()
    backbone.train()
    td.train()
    x = torch.randn(8, 1, 8, 8)
    logits, features = backbone(x)
    target = torch.softmax(torch.randn(8, 10) * 3, dim=1)  # a fixed p̄, not the backbone's output
    kl = td_kl_loss(td(features), target)  # the KL term alone, no cross-entropy
    kl.backward()
    first_conv = backbone.stages[0][0]
    assert isinstance(first_conv, torch.nn.Conv2d)
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum().item() > 0
    # the classification head is not on the KL path
    assert backbone.head.weight.grad is None
    # and the module itself is trained by it
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in td.out.parameters())


def test_td_task_never_detaches_the_backbone_features():
    # As in the reference (hyperconnect/TiDAL train_test.py:train_epoch): only Learning Loss detaches
    # its input after an epoch; the TD module's KL reaches the backbone in every epoch, whatever
    # train.lloss_detach_epoch says.
    from tidal.train import TrainConfig, aux_task

    backbone, td = _backbone_and_td()
    cfg = TrainConfig(epochs=5, batch_size=4, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[],
                      td_weight=1.0, crop_pad=0, hflip=False, lloss_detach_epoch=0)
    task = aux_task(td, cfg)
    _, features = backbone(torch.randn(4, 1, 8, 8))
    target = torch.softmax(torch.randn(4, 10), dim=1)
    td_kl_loss(task.forward(features, epoch=10**6), target).backward()
    assert backbone.stages[0][0].weight.grad.abs().sum().item() > 0
