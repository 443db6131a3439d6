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
    return params, pipeline.train_step(params, 0)["checkpoint"]


def test_the_spec_comes_from_the_checkpoint_not_the_data(trained, monkeypatch):
    params, checkpoint = trained
    expected = {"backbone": "small-cnn", "dropout": 0.0, "num_classes": 10, "in_shape": [1, 8, 8]}
    assert torch.load(checkpoint, weights_only=True)["spec"] == expected

    def no_data(params):
        raise AssertionError("the data set was loaded to log a checkpoint")

    monkeypatch.setattr(pipeline, "dataset_for", no_data)
    assert checkpoint_spec(params, checkpoint) == expected


def test_a_checkpoint_from_before_the_spec_gets_it_from_the_data(trained):
    params, checkpoint = trained
    saved = torch.load(checkpoint, weights_only=True)
    spec = saved.pop("spec")
    torch.save(saved, checkpoint)  # a checkpoint without its spec
    assert checkpoint_spec(params, checkpoint) == spec
    pipeline.load_models(params, checkpoint)  # and such a checkpoint still loads
