"""Backbones that expose their feature stages, and the TD prediction module."""
from tidal.models.backbones import BACKBONES, build_backbone
from tidal.models.td_module import TDPredictor

__all__ = ["BACKBONES", "build_backbone", "TDPredictor"]
