"""Test accuracy of a backbone, in batches under inference mode."""
from __future__ import annotations

import torch
from torch import nn

from tidal.train import normalize, precision_context, prepare_input, prepare_model, to_float


@torch.inference_mode()
def predict_logits(backbone: nn.Module, images_u8: torch.Tensor, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    net = prepare_model(backbone.eval(), device)
    with precision_context(device):  # bf16 on CUDA; nothing on CPU
        out = [net(prepare_input(normalize(to_float(chunk.to(device))), device))[0].float().cpu()
               for chunk in images_u8.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(backbone: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 512) -> float:
    logits = predict_logits(backbone, images_u8, device, batch_size)
    return float((logits.argmax(1) == labels).float().mean())
