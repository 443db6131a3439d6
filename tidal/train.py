"""One cycle's training: CE(f(x), y) + λ·KL(p̄ ‖ p̃), with the TD recorder and batched augmentation.

Data lives on the training device as uint8; each batch is cropped and flipped there, so
there is no per-sample Python or PIL work in the loop. Loss and accuracy are accumulated on
the device and read once per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tidal.dynamics import TDRecorder
from tidal.progress import progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: list[int]
    td_weight: float
    crop_pad: int
    hflip: bool

    @classmethod
    def from_params(cls, train: dict) -> "TrainConfig":
        return cls(**train)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float 0..1 (normalization lives in `normalize`, after augmentation)."""
    return images_u8.float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def augment(x: torch.Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding `crop_pad`) and horizontal flip, all on x's device."""
    b, c, h, w = x.shape
    if crop_pad > 0:
        padded = F.pad(x, (crop_pad,) * 4)
        offsets = torch.randint(0, 2 * crop_pad + 1, (2, b), generator=generator, device=x.device)
        rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded.gather(2, rows.expand(b, c, h, w + 2 * crop_pad)).gather(3, cols.expand(b, c, h, w))
    if hflip:
        flip = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def td_kl_loss(td_logits: torch.Tensor, td_target: torch.Tensor) -> torch.Tensor:
    """KL(p̄ ‖ p̃) with batchmean; p̄ (the recorded TD) is a fixed target."""
    return F.kl_div(F.log_softmax(td_logits, dim=1), td_target.detach(), reduction="batchmean")


def _batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    batches = list(perm.split(batch_size))
    # BatchNorm cannot train on a batch of one; such a tail batch waits for the next epoch.
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def train_cycle(
    backbone: nn.Module,
    td_module: nn.Module | None,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
) -> list[dict]:
    """Train backbone (and TD module, when given) from scratch on one labeled set.

    Returns one record per epoch: epoch, loss, accuracy, td_kl, lr.
    """
    backbone.to(device).train()
    params = list(backbone.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=0.1)
    recorder = None
    if td_module is not None:
        td_module.to(device).train()
        # The module has its own optimizer with the backbone's hyperparameters (as in the paper).
        td_opt = torch.optim.SGD(td_module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay)
        td_sched = torch.optim.lr_scheduler.MultiStepLR(td_opt, milestones=cfg.milestones, gamma=0.1)
        recorder = TDRecorder(len(labels), td_module.num_classes, device)
    images = to_float(images_u8.to(device))
    labels = labels.to(device)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    history = []
    for epoch in progress(range(1, cfg.epochs + 1), desc=desc, total=cfg.epochs):
        sums = torch.zeros(4, device=device)  # loss, correct, td_kl, seen
        for idx in _batches(torch.randperm(len(labels), generator=order_gen).to(device), cfg.batch_size):
            x = normalize(augment(images[idx], cfg.crop_pad, cfg.hflip, aug_gen))
            y = labels[idx]
            logits, features = backbone(x)
            loss = F.cross_entropy(logits, y)
            kl = torch.zeros((), device=device)
            if td_module is not None:
                target = recorder.update(idx, torch.softmax(logits, dim=1))
                kl = td_kl_loss(td_module(features), target)
                loss = loss + cfg.td_weight * kl
                td_opt.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if td_module is not None:
                td_opt.step()
            n = len(idx)
            sums += torch.stack([loss.detach() * n, (logits.argmax(1) == y).sum().float(), kl.detach() * n,
                                 torch.tensor(float(n), device=device)])
        sched.step()
        if td_module is not None:
            td_sched.step()
        loss_sum, correct, kl_sum, seen = sums.tolist()
        record = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                  "td_kl": kl_sum / seen, "lr": opt.param_groups[0]["lr"]}
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"training loss became {record['loss']} at epoch {epoch}; "
                                   f"lower train.lr (now {cfg.lr}) or check the labels")
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history
