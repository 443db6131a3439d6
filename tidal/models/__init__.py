"""Backbones that expose their feature stages, and the TD prediction module."""
from tidal.models.backbones import BACKBONES, ResNet18, SmallCNN, build_backbone
from tidal.models.td_module import TDPredictor

__all__ = ["BACKBONES", "ResNet18", "SmallCNN", "build_backbone", "TDPredictor"]
