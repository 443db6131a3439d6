"""Predictions and accuracy of a backbone, in batches under inference mode."""
from __future__ import annotations

import torch
from torch import nn

from tidal.train import model_input, precision_context, prepare_input, prepare_model


def mean_of_views(logits: torch.Tensor, mirrored_logits: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the mean logits of an image and of its mirror."""
    return 0.5 * (logits + mirrored_logits)


@torch.inference_mode()
def predict_logits(backbone: nn.Module, images_u8: torch.Tensor, device: torch.device,
                   batch_size: int = 512, hflip: bool = False) -> torch.Tensor:
    """Logits of each image; with `hflip`, the mean of the logits of the image and its mirror
    (test-time augmentation, as the fast CIFAR-10 trainers evaluate; only for data whose
    classes are mirror-symmetric, like the training's `train.hflip`)."""
    net = prepare_model(backbone.eval(), device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return net(prepare_input(x, device))[0].float()

    out = []
    with precision_context(device):  # bf16 on CUDA; nothing on CPU
        for chunk in images_u8.split(batch_size):
            x = model_input(chunk.to(device))
            logits = forward(x)
            if hflip:
                logits = mean_of_views(logits, forward(x.flip(-1)))
            out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(backbone: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 512, hflip: bool = False) -> float:
    logits = predict_logits(backbone, images_u8, device, batch_size, hflip)
    return float((logits.argmax(1) == labels).float().mean())
