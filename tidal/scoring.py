"""Score candidates in fixed-size batches under inference mode, keeping only the running top-k.

Memory holds one batch plus k scores, whatever the number of candidates.
"""
from __future__ import annotations

import torch
from torch import nn

from tidal.progress import progress
from tidal.strategies.base import ModelOutput, Strategy
from tidal.train import normalize, to_float


@torch.inference_mode()
def top_k_uncertain(
    backbone: nn.Module,
    td_module: nn.Module | None,
    images_u8: torch.Tensor,
    strategy: Strategy,
    k: int,
    device: torch.device,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into images_u8) and scores of the k highest-scoring candidates, best first.

    Ties keep the earlier position, so the result does not depend on the batch size.
    """
    if strategy.uses_td_module and td_module is None:
        raise ValueError(f"strategy '{strategy.name}' needs the TD module, but none was trained")
    backbone.to(device).eval()
    if td_module is not None:
        td_module.to(device).eval()
    top_scores = torch.empty(0)
    top_pos = torch.empty(0, dtype=torch.long)
    starts = range(0, len(images_u8), batch_size)
    for start in progress(starts, desc="score", total=len(starts)):
        x = normalize(to_float(images_u8[start:start + batch_size].to(device)))
        logits, features = backbone(x)
        td_logits = td_module(features) if strategy.uses_td_module else None
        scores = strategy.score(ModelOutput(logits=logits, td_logits=td_logits)).float().cpu()
        pos = torch.arange(start, start + len(scores))
        all_scores = torch.cat([top_scores, scores])
        all_pos = torch.cat([top_pos, pos])
        order = torch.sort(all_scores, descending=True, stable=True).indices[:k]
        top_scores, top_pos = all_scores[order], all_pos[order]
    return top_pos, top_scores
