"""The `npy` source: pre-decoded arrays, memory-mapped, with ids made from positions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tidal import pipeline
from tidal.config import load_params
from tidal.data import DataError, load_dataset, materialize
from tidal.data.dataset import PositionalIds
from tidal.data.sources import NPY_FILES
from tidal.experiment import prepare_data, start_experiment


def write_npy(root: Path, n_pool: int = 50, n_test: int = 12, shape=(1, 8, 8), classes: int = 3, **override) -> Path:
    """A valid npy data root; `override` replaces one array, e.g. pool_labels=np.zeros(3)."""
    rng = np.random.default_rng(0)
    arrays = {
        "pool_images": rng.integers(0, 256, (n_pool, *shape), dtype=np.uint8),
        "pool_labels": np.arange(n_pool, dtype=np.int64) % classes,
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": np.arange(n_test, dtype=np.int64) % classes,
        **override,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array)
    return root


def test_npy_reads_memory_mapped_arrays_with_positional_ids(tmp_path):
    root = write_npy(tmp_path / "d", pool_labels=np.array([0, 2, -1, 1] * 12 + [0, 0], dtype=np.int64))
    data = load_dataset(root, "npy")
    pool = np.load(root / "pool_images.npy")
    assert data.pool_images.shape == (50, 1, 8, 8) and data.pool_images.dtype == torch.uint8
    assert torch.equal(data.pool_images, torch.from_numpy(pool))
    assert data.test_labels.tolist() == (np.arange(12) % 3).tolist()
    assert data.classes == ["0", "1", "2"] and data.in_channels == 1
    assert data.pool_labels[2].item() == -1  # an unlabeled pool sample
    # Ids are stable strings made from positions; no list of ids is held.
    assert isinstance(data.pool_ids, PositionalIds) and len(data.pool_ids) == 50
    assert data.pool_ids[0] == "npy-0000000" and data.pool_ids[-1] == "npy-0000049"
    assert list(data.pool_ids)[:2] == data.pool_ids[:2] == ["npy-0000000", "npy-0000001"]
    assert data.index_of(["npy-0000042", "npy-0000007"]).tolist() == [42, 7]
    assert "npy-0000049" in data.pool_ids and "npy-0000050" not in data.pool_ids
    for unknown in ("npy-42", "npy-0000050", "digits-0000001", "npy-00000x1"):
        with pytest.raises(DataError, match="not in the npy pool"):
            data.index_of([unknown])
    # Memory-mapped, not loaded: the tensor shares the mapping; a write stays out of the file.
    assert isinstance(data.mapped[0], np.memmap)
    assert data.pool_images.data_ptr() == data.mapped[0].ctypes.data
    data.pool_images[0] = 0
    data.release_pages()
    assert np.array_equal(np.load(root / "pool_images.npy"), pool)


BAD = [
    ("pool_images", lambda: np.zeros((50, 1, 8, 8), dtype=np.float32), "pool_images.npy holds float32"),
    ("pool_images", lambda: np.zeros((50, 8, 8), dtype=np.uint8), r"pool_images.npy holds uint8 with shape \(50, 8, 8\)"),
    ("test_images", lambda: np.zeros((12, 3, 8, 8), dtype=np.uint8), "test_images.npy holds images of shape C×H×W"),
    ("pool_labels", lambda: np.zeros(50, dtype=np.int32), "pool_labels.npy holds int32"),
    ("pool_labels", lambda: np.zeros((50, 1), dtype=np.int64), "pool_labels.npy holds int64 with shape"),
    ("pool_labels", lambda: np.zeros(49, dtype=np.int64), "pool_labels.npy holds 49 labels for the 50 images"),
    ("pool_labels", lambda: np.full(50, -2, dtype=np.int64), "pool_labels.npy holds the label -2"),
    ("test_labels", lambda: np.full(12, -1, dtype=np.int64), "test_labels.npy holds the label -1"),
    ("pool_images", lambda: np.zeros((0, 1, 8, 8), dtype=np.uint8), "pool_images.npy holds no images"),
    ("pool_images", lambda: np.asfortranarray(np.zeros((50, 1, 8, 8), dtype=np.uint8)), "Fortran order"),
    ("pool_images", lambda: np.array([{"a": 1}] * 50, dtype=object), "pool_images.npy is not a readable .npy"),
]


@pytest.mark.parametrize("name, make, message", BAD, ids=[b[2].split(" holds ")[-1][:30] for b in BAD])
def test_npy_bad_arrays_are_errors_naming_the_file(tmp_path, name, make, message):
    root = write_npy(tmp_path / "d", **{name: make()})
    with pytest.raises(DataError, match=message) as err:
        load_dataset(root, "npy")
    assert str(root / f"{name}.npy") in str(err.value)


def test_npy_garbage_and_missing_files_are_errors_naming_them(tmp_path):
    root = write_npy(tmp_path / "d")
    (root / "test_labels.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=f"{root / 'test_labels.npy'} is not a readable .npy file"):
        load_dataset(root, "npy")
    (root / "test_labels.npy").unlink()
    for call in (lambda: materialize(root, "npy"), lambda: load_dataset(root, "npy")):
        with pytest.raises(DataError, match=r"dataset 'npy' is missing \['test_labels.npy'\]") as err:
            call()
        assert "np.save" in str(err.value)
    assert NPY_FILES == ("pool_images.npy", "pool_labels.npy", "test_images.npy", "test_labels.npy")


def test_npy_pool_runs_a_cycle_through_the_pipeline(tmp_path):
    """The steps work on a memory-mapped pool: initial set, training, scoring, oracle labels."""
    root = write_npy(tmp_path / "d", n_pool=300, n_test=30)
    params = load_params(None, ["preset=debug", "dataset=npy", f"data_root={root}", f"runs_dir={tmp_path}/runs",
                                "tracking=false", "train.epochs=1", "scoring.shards=2", "score_batch_size=32"])
    prepared = prepare_data(params)
    state = start_experiment(params, prepared["data_version"])
    assert len(state["labeled"]) == 40 and all(i.startswith("npy-") for i in state["labeled"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    assert 0 <= pipeline.evaluate_step(params, 0, checkpoint) <= 1
    shards = [pipeline.score_shard_step(params, 0, checkpoint, s, 2)["path"] for s in range(2)]
    ids = pipeline.select_step(pipeline.merge_scores_step(params, 0, shards), params["budget"])
    assert len(set(ids)) == 20 and not set(ids) & set(state["labeled"])
    labels = pipeline.reveal_oracle_labels(params, ids)
    assert labels == {i: int(i[4:]) % 3 for i in ids}
