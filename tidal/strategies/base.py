"""What every query strategy sees, and the one method each kind implements.

Two kinds of strategy:
- `Strategy` (pointwise): `score(out)` gives each candidate a score from its own model outputs,
  so scoring can stream the candidates in batches and keep only the running top-k.
- `SetStrategy`: `select(candidates, labeled, k)` chooses the k jointly (CoreSet, BADGE), from
  the backbone outputs of the whole candidate set (and of the labeled set, when it asks for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class ModelOutput:
    """Outputs for one batch of candidates (eval mode, no augmentation)."""

    logits: torch.Tensor  # backbone class logits, B×C
    td_logits: torch.Tensor | None = None  # TD module logits, B×C (TiDAL strategies only)
    pred_loss: torch.Tensor | None = None  # loss prediction module's output, B (aux "loss" only)
    embedding: torch.Tensor | None = None  # penultimate features (the head's input), B×D (uses_head only)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # backbone head: B×D -> B×C (uses_head only)


@dataclass
class Embeddings:
    """Backbone outputs for a whole set of samples, gathered batch by batch."""

    logits: torch.Tensor  # N×C
    features: torch.Tensor  # N×D penultimate features (global-average-pooled last stage)


class QueryStrategy:
    """What both kinds share: a registry name, a seed, and how params configure them."""

    name: str = ""
    aux: str | None = None  # the auxiliary module it trains and scores with: a key of tidal.train.AUX_MODULES

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def from_params(cls, params: dict[str, Any], seed: int = 0) -> "QueryStrategy":
        """Build from the experiment params; strategies with their own keys override this."""
        return cls(seed=seed)


class Strategy(QueryStrategy):
    """A pointwise strategy scores candidates; higher score = more uncertain = labeled sooner."""

    uses_head: bool = False  # needs ModelOutput.embedding and .head (e.g. MC dropout on the head)

    def score(self, out: ModelOutput) -> torch.Tensor:
        raise NotImplementedError

    def skip(self, n: int) -> None:
        """Move on as if n candidates had been scored, without scoring them.

        Scoring a shard that starts at candidate n then gives its candidates the scores an
        unsharded run gives them. Only strategies that draw random numbers per candidate
        (random, bald) have a stream to move on; the others have nothing to do.
        """


def discard_uniform(generator: torch.Generator, count: int, chunk: int = 1 << 22) -> None:
    """Draw `count` uniform floats and drop them, a chunk at a time (16 MB at most).

    The CPU generator hands out one draw per float whatever the tensor sizes, so this moves it
    exactly as far as `torch.rand(count, generator=generator)` would.
    """
    buffer = torch.empty(min(count, chunk))
    while count > 0:
        n = min(count, chunk)
        buffer[:n].uniform_(generator=generator)
        count -= n


class SetStrategy(QueryStrategy):
    """A set strategy chooses k candidates jointly from their embeddings."""

    uses_labeled: bool = False  # needs the labeled set's embeddings too

    def select(self, candidates: Embeddings, labeled: Embeddings | None, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (into candidates) of the k chosen, in selection order, and a score for each."""
        raise NotImplementedError


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ p log p, with 0·log 0 taken as 0."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=1)
