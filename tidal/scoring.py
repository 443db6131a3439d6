"""Choose the candidates to label, in fixed-size batches under inference mode.

Pointwise strategies (`Strategy.score`) stream the candidates and keep only the running top-k:
memory holds one batch plus k scores, whatever the number of candidates. Set strategies
(`SetStrategy.select`, e.g. CoreSet, BADGE) need every candidate at once, so the backbone's
logits and penultimate features (N×(C + D), never the images) are gathered batch by batch and
the strategy then chooses k from them.

A huge pool is scored in shards (pointwise strategies only; set strategies are refused when the
params are read, tidal.config.validate, and by `top_k_uncertain`): `shard_range` cuts the candidate
list into runs of whole batches, `score_shard` keeps one run's top-k reading its images a batch
at a time, and `merge_top_k` merges the shards' lists into exactly the unsharded result.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tidal.models.backbones import penultimate
from tidal.progress import progress
from tidal.strategies.base import Embeddings, ModelOutput, QueryStrategy, SetStrategy, Strategy
from tidal.train import AUX_MODULES, model_input, precision_context, prepare_input, prepare_model


def _check_aux(strategy: QueryStrategy, aux_module: nn.Module | None) -> None:
    """A strategy that reads an auxiliary module (the TD module, the loss predictor) gets one."""
    if strategy.aux and aux_module is None:
        raise ValueError(f"strategy '{strategy.name}' needs the {AUX_MODULES[strategy.aux].title}, "
                         f"but none was trained")


def _check_pointwise(strategy: QueryStrategy) -> None:
    if isinstance(strategy, SetStrategy):
        raise TypeError(f"strategy '{strategy.name}' chooses a set jointly; use select_candidates")


class Rows:
    """`images[positions]`, gathered a slice at a time: only the rows of one batch are copied.

    `release` runs after each gather (e.g. `Dataset.release_pages`), so the pages of a
    memory-mapped pool that a batch touched do not pile up in this process.
    """

    def __init__(self, images: torch.Tensor, positions: torch.Tensor,
                 release: Callable[[], None] | None = None) -> None:
        self.images, self.positions, self.release = images, positions, release

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        batch = self.images[self.positions[rows]]
        if self.release is not None:
            self.release()
        return batch


@torch.inference_mode()
def top_k_uncertain(
    backbone: nn.Module,
    aux_module: nn.Module | None,
    images_u8: torch.Tensor | Rows,
    strategy: Strategy,
    k: int,
    device: torch.device,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into images_u8) and scores of the k highest-scoring candidates, best first.

    Ties keep the earlier position, so the result does not depend on the batch size.
    `aux_module` is the TD module (TiDAL strategies) or the loss predictor (lloss), else None.
    `images_u8` is read one batch slice at a time, so it may be a lazy `Rows`.
    """
    _check_pointwise(strategy)
    _check_aux(strategy, aux_module)
    head = getattr(backbone, "head", None) if strategy.uses_head else None
    if strategy.uses_head and head is None:
        raise ValueError(f"strategy '{strategy.name}' needs a backbone with a `head` module")
    net = prepare_model(backbone.eval(), device)
    if aux_module is not None:
        aux_module.to(device).eval()
    top_scores = torch.empty(0)
    top_pos = torch.empty(0, dtype=torch.long)
    starts = range(0, len(images_u8), batch_size)
    for start in progress(starts, desc="score", total=len(starts)):
        x = prepare_input(model_input(images_u8[start:start + batch_size].to(device)), device)
        with precision_context(device):
            logits, features = net(x)
            aux_out = {AUX_MODULES[strategy.aux].output: aux_module(features).float()} if strategy.aux else {}
        out = ModelOutput(logits=logits.float(), **aux_out,
                          embedding=penultimate(features).float() if head is not None else None, head=head)
        scores = strategy.score(out).float().cpu()
        pos = torch.arange(start, start + len(scores))
        all_scores = torch.cat([top_scores, scores])
        all_pos = torch.cat([top_pos, pos])
        order = torch.sort(all_scores, descending=True, stable=True).indices[:k]
        top_scores, top_pos = all_scores[order], all_pos[order]
    return top_pos, top_scores


@torch.inference_mode()
def embed(backbone: nn.Module, images_u8: torch.Tensor | Rows, device: torch.device, batch_size: int = 512,
          desc: str = "embed") -> Embeddings:
    """Backbone logits (N×C) and penultimate features (N×D) of every image, on `device`."""
    net = prepare_model(backbone.eval(), device)
    logits_parts, feature_parts = [], []
    starts = range(0, len(images_u8), batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        x = prepare_input(model_input(images_u8[start:start + batch_size].to(device)), device)
        with precision_context(device):
            logits, features = net(x)
        logits_parts.append(logits.float())
        feature_parts.append(penultimate(features).float())
    if not logits_parts:
        return Embeddings(logits=torch.empty(0, 0, device=device), features=torch.empty(0, 0, device=device))
    return Embeddings(logits=torch.cat(logits_parts), features=torch.cat(feature_parts))


@torch.inference_mode()
def select_set(
    backbone: nn.Module,
    images_u8: torch.Tensor | Rows,
    strategy: SetStrategy,
    k: int,
    device: torch.device,
    batch_size: int = 512,
    labeled_u8: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into images_u8) of the k the set strategy chooses, in selection order, and scores."""
    candidates = embed(backbone, images_u8, device, batch_size, desc="embed candidates")
    labeled = None
    if strategy.uses_labeled and labeled_u8 is not None and len(labeled_u8) > 0:
        labeled = embed(backbone, labeled_u8, device, batch_size, desc="embed labeled")
    pos, scores = strategy.select(candidates, labeled, min(k, len(images_u8)))
    return pos.cpu(), scores.float().cpu()


def select_candidates(
    backbone: nn.Module,
    aux_module: nn.Module | None,
    images_u8: torch.Tensor | Rows,
    strategy: QueryStrategy,
    k: int,
    device: torch.device,
    batch_size: int = 512,
    labeled_u8: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Either kind of strategy: positions of the k to label (in order) and a score for each.

    `labeled_u8` (the labeled images) is read only by set strategies that ask for it (CoreSet).
    """
    _check_aux(strategy, aux_module)
    if isinstance(strategy, SetStrategy):
        return select_set(backbone, images_u8, strategy, k, device, batch_size, labeled_u8)
    return top_k_uncertain(backbone, aux_module, images_u8, strategy, k, device, batch_size)


# --- shards -------------------------------------------------------------------------------------

def shard_range(n_candidates: int, shard: int, n_shards: int, batch_size: int) -> tuple[int, int]:
    """Candidates [start, stop) of one shard: an equal share of whole scoring batches.

    Shard boundaries fall on batch boundaries of the unsharded run, so every batch a shard scores
    is one that run scores (same images, same batch size: the same floats out of the model, even
    where a kernel's arithmetic depends on the batch size). Trailing shards may be empty.
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not one of 0..{n_shards - 1}")
    n_batches = -(-n_candidates // batch_size)
    per_shard = -(-n_batches // n_shards) * batch_size
    start = min(shard * per_shard, n_candidates)
    return start, min(start + per_shard, n_candidates)


def score_shard(
    backbone: nn.Module,
    aux_module: nn.Module | None,
    images_u8: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    strategy: Strategy,
    k: int,
    device: torch.device,
    batch_size: int = 512,
    release: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of the shard that starts at candidate `start`: (candidate numbers, scores), best first.

    `positions` are the shard's rows of `images_u8` (the pool), in candidate order; the returned
    candidate numbers count from the start of the whole candidate list (start + i), the order
    `merge_top_k` breaks ties by. Images are gathered a batch at a time (`Rows`).
    """
    _check_pointwise(strategy)
    strategy.skip(start)  # random, bald: the random draws the candidates before this shard took
    pos, scores = top_k_uncertain(backbone, aux_module, Rows(images_u8, positions, release), strategy, k,
                                  device, batch_size)
    return pos + start, scores


def merge_top_k(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of the union of the shards' (candidate numbers, scores) lists, best first.

    Exact: each shard's top k holds every candidate of the overall top k that lies in it.
    Sorting by candidate number first, then stably by score, breaks ties towards the earlier
    candidate, as `top_k_uncertain` does over the whole list.
    """
    if not parts:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    pos = torch.cat([p for p, _ in parts])
    scores = torch.cat([s for _, s in parts])
    if len(torch.unique(pos)) != len(pos):
        raise ValueError("two shards list the same candidate; each candidate belongs to one shard")
    by_candidate = torch.argsort(pos, stable=True)
    pos, scores = pos[by_candidate], scores[by_candidate]
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return pos[order], scores[order]
