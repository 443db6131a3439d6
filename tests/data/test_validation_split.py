"""validation_size: a seeded split of the labeled pool stands in for the test split, so settings are
chosen without reading the real test split."""
from __future__ import annotations

import json

import pytest
import torch

from test_npy_source import write_npy  # beside this file
from tidal import pipeline
from tidal.config import load_params
from tidal.data.dataset import hold_out_validation
from tidal.data.errors import DataError
from tidal.data.sources import load_dataset
from tidal.experiment import load_state, prepare_data, start_experiment
from tidal.workspace import workspace


def test_the_held_out_split_is_disjoint_seeded_and_keeps_labels(data_root):
    data = load_dataset(data_root, "digits")
    a = hold_out_validation(data, 200, seed=0)
    assert len(a.test_labels) == 200 and len(a.pool_ids) == len(data.pool_ids) - 200
    truth = {i: (img, y) for i, img, y in zip(data.pool_ids, data.pool_images, data.pool_labels.tolist())}
    held = [i for i in data.pool_ids if i not in set(a.pool_ids)]
    assert len(held) == 200
    # each held-out image is a pool image with its own label, in pool order
    for img, y, i in zip(a.test_images, a.test_labels.tolist(), held):
        assert torch.equal(img, truth[i][0]) and y == truth[i][1]
    assert all(torch.equal(a.pool_images[k], truth[i][0]) for k, i in enumerate(a.pool_ids[:50]))
    again = hold_out_validation(data, 200, seed=0)
    assert list(again.pool_ids) == list(a.pool_ids)
    assert list(hold_out_validation(data, 200, seed=1).pool_ids) != list(a.pool_ids)


def test_the_views_of_a_memory_mapped_pool_read_rows_and_copy_none(tmp_path):
    """The validation split's pool and the imbalanced pool are rows of the mapped file, gathered
    when indexed, never a copy of every row kept (a big pool would be read whole into memory)."""
    import numpy as np

    from tidal.data.dataset import PoolRows, imbalanced

    data = load_dataset(write_npy(tmp_path / "npy", n_pool=60), "npy")
    mapped = data.mapped[0].ctypes.data
    assert data.pool_images.data_ptr() == mapped
    val = hold_out_validation(data, 10, seed=0)
    both = hold_out_validation(imbalanced(data, 2.0, seed=0), 10, seed=0)
    for view in (val, imbalanced(data, 2.0, seed=0), both):
        assert isinstance(view.pool_images, PoolRows) and view.pool_images.images.data_ptr() == mapped
        assert view.mapped == data.mapped  # so release_pages still lets the read pages go
        positions = data.index_of(list(view.pool_ids))
        assert view.pool_images.shape == (len(view.pool_ids), *data.pool_images.shape[1:])
        assert torch.equal(view.pool_images[:], data.pool_images[positions])
        picks = torch.tensor([3, 0, len(view.pool_ids) - 1])
        assert torch.equal(view.pool_images[picks], data.pool_images[positions[picks]])
        assert torch.equal(view.pool_images[2], data.pool_images[positions[2]])
    assert np.array_equal(both.pool_images.positions.numpy(), data.index_of(list(both.pool_ids)).numpy())


def test_a_split_as_big_as_the_pool_is_a_clear_error(data_root):
    data = load_dataset(data_root, "digits")
    with pytest.raises(DataError, match="validation_size=1438 leaves no pool"):
        hold_out_validation(data, len(data.pool_ids), seed=0)


def test_an_experiment_on_the_validation_split_never_labels_or_reads_the_test_split(tmp_path, data_root,
                                                                                      monkeypatch, capsys):
    overrides = ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}", "tracking=false",
                 "validation_size=300", "cycles=2"]
    params = load_params(None, overrides)
    full = load_dataset(data_root, "digits")
    held = set(full.pool_ids) - set(hold_out_validation(full, 300, params["seed"]).pool_ids)
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    for cycle in range(2):
        pipeline.run_cycle(params, cycle)
    state = load_state(params)
    assert len(state["labeled"]) == 40 + 2 * 20 and not set(state["labeled"]) & held
    evaluated = json.loads((workspace(params).cycle_dir(1) / "eval.json").read_text())
    assert evaluated["n_evaluated"] == 300  # the validation split, not the 359 test images
    assert evaluated["split"] == "validation"
    assert json.loads(workspace(params).metrics_path.read_text())["split"] == "validation"
    # What `tidal status` prints names the split the accuracy was measured on.
    from tidal.cli import main as tidal_main

    capsys.readouterr()
    assert tidal_main(["status", *sum((["--set", o] for o in overrides), [])]) == 0
    out = capsys.readouterr().out
    assert "last validation accuracy:" in out and "test accuracy" not in out
