"""Backbones that expose their feature stages, the TD prediction module and the loss prediction module."""
from tidal.models.backbones import BACKBONES, CifarCNN, ResNet18, SmallCNN, build_backbone
from tidal.models.loss_module import LossPredictor, loss_ranking_loss
from tidal.models.td_module import TDPredictor

__all__ = ["BACKBONES", "CifarCNN", "ResNet18", "SmallCNN", "build_backbone", "TDPredictor", "LossPredictor",
           "loss_ranking_loss"]
