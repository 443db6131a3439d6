"""tidal.tracking without an MLflow store: the model spec the log-cycle step hands the tracker."""
from __future__ import annotations

import pytest
import torch

from tidal import pipeline
from tidal.config import load_params
from tidal.experiment import prepare_data, start_experiment
from tidal.tracking import checkpoint_spec


@pytest.fixture
def trained(tmp_path, data_root):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}", "tracking=false",
                                "train.epochs=1"])
    start_experiment(params, prepare_data(params)["data_version"])
    return pipeline.train_step(params, 0)["checkpoint"]


def test_the_spec_comes_from_the_checkpoint(trained):
    checkpoint = trained
    expected = {"backbone": "small-cnn", "dropout": 0.0, "num_classes": 10, "in_shape": [1, 8, 8]}
    assert torch.load(checkpoint, weights_only=True)["spec"] == expected
    assert checkpoint_spec(checkpoint) == expected
