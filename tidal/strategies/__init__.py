"""Query strategies: one small class each, behind one registry."""
from __future__ import annotations

from typing import Any

from tidal.strategies.badge import BADGE
from tidal.strategies.bald import BALD
from tidal.strategies.base import Embeddings, ModelOutput, QueryStrategy, SetStrategy, Strategy
from tidal.strategies.coreset import CoreSet
from tidal.strategies.entropy import Entropy
from tidal.strategies.least_confidence import LeastConfidence
from tidal.strategies.lloss import LearningLoss
from tidal.strategies.margin import Margin
from tidal.strategies.random_sampling import RandomSampling
from tidal.strategies.tidal_entropy import TiDALEntropy
from tidal.strategies.tidal_margin import TiDALMargin

STRATEGIES: dict[str, type[QueryStrategy]] = {
    cls.name: cls for cls in (RandomSampling, Entropy, TiDALEntropy, TiDALMargin,
                              Margin, LeastConfidence, BALD, CoreSet, BADGE, LearningLoss)
}


def build_strategy(name: str, seed: int = 0, params: dict[str, Any] | None = None) -> QueryStrategy:
    """The named strategy; with params, built from its own keys there (e.g. bald_passes)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    return cls(seed=seed) if params is None else cls.from_params(params, seed=seed)


__all__ = ["STRATEGIES", "Embeddings", "ModelOutput", "QueryStrategy", "SetStrategy", "Strategy",
           "build_strategy"]
