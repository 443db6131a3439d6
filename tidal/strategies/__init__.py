"""Query strategies: one small class each, behind one registry."""
from __future__ import annotations

from tidal.strategies.base import ModelOutput, Strategy
from tidal.strategies.entropy import Entropy
from tidal.strategies.random_sampling import RandomSampling
from tidal.strategies.tidal_entropy import TiDALEntropy
from tidal.strategies.tidal_margin import TiDALMargin

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RandomSampling, Entropy, TiDALEntropy, TiDALMargin)
}


def build_strategy(name: str, seed: int = 0) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](seed=seed)


__all__ = ["STRATEGIES", "ModelOutput", "Strategy", "build_strategy"]
