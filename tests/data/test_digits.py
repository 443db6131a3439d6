"""The digits source: deterministic files, stratified test split, stable ids, imbalance."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tidal.data import DataError, load_dataset, materialize
from tidal.data.sources import DIGITS_TEST_FRACTION, SOURCES
from tidal.data.version import dvc_dir_md5, pinned_md5

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-data")
    materialize(root, "digits")
    return root


def test_materialize_is_byte_identical(tmp_path, data_root):
    other = materialize(tmp_path / "again", "digits")
    first = data_root / "digits"
    assert sorted(p.name for p in other.iterdir()) == sorted(SOURCES["digits"].files)
    for name in SOURCES["digits"].files:
        assert (first / name).read_bytes() == (other / name).read_bytes(), name
    assert dvc_dir_md5(first) == dvc_dir_md5(other)


def test_fresh_materialization_matches_the_committed_dvc_pin(tmp_path):
    # data.dvc pins data_root (which holds digits/); a fresh clone must reproduce it exactly.
    materialize(tmp_path, "digits")
    assert dvc_dir_md5(tmp_path) == pinned_md5(REPO / "data.dvc")


def test_dir_hash_sees_a_changed_byte(tmp_path):
    d = materialize(tmp_path / "root", "digits")
    before = dvc_dir_md5(d)
    labels = d / "labels.npy"
    raw = bytearray(labels.read_bytes())
    raw[-1] ^= 1
    labels.write_bytes(bytes(raw))
    assert dvc_dir_md5(d) != before


def test_materialize_keeps_existing_files(tmp_path):
    d = materialize(tmp_path, "digits")
    marker = d / "labels.npy"
    mtime = marker.stat().st_mtime_ns
    assert materialize(tmp_path, "digits") == d
    assert marker.stat().st_mtime_ns == mtime


def test_load_without_materialize_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_dataset(tmp_path, "digits")


def test_test_split_is_stratified_and_disjoint(data_root):
    data = load_dataset(data_root, "digits")
    all_labels = np.load(data_root / "digits" / "labels.npy")
    per_class_total = Counter(all_labels.tolist())
    test_counts = Counter(data.test_labels.tolist())
    assert sorted(per_class_total) == list(range(10))
    for c, n_c in per_class_total.items():
        assert test_counts[c] == int(round(DIGITS_TEST_FRACTION * n_c)), f"class {c}"
    assert len(data.pool_ids) + len(data.test_labels) == len(all_labels) == 1797
    # disjoint: the pool ids and the test positions never overlap
    is_test = np.load(data_root / "digits" / "is_test.npy")
    test_ids = {f"digits-{i:05d}" for i in np.flatnonzero(is_test)}
    assert not test_ids & set(data.pool_ids)
    assert len(test_ids) == len(data.test_labels)


def test_shapes_and_dtypes(data_root):
    data = load_dataset(data_root, "digits")
    assert data.pool_images.dtype == torch.uint8
    assert data.pool_images.shape[1:] == (1, 8, 8)
    assert data.test_images.shape[1:] == (1, 8, 8)
    assert int(data.pool_images.max()) == 255  # 0..16 scaled to the full byte range
    assert data.num_classes == 10 and data.in_channels == 1
    assert len(data.pool_images) == len(data.pool_labels) == len(data.pool_ids)


def test_ids_unique_and_stable_across_reloads(tmp_path, data_root):
    a = load_dataset(data_root, "digits")
    b = load_dataset(data_root, "digits")
    c = load_dataset(materialize(tmp_path, "digits").parent, "digits")
    assert len(set(a.pool_ids)) == len(a.pool_ids)
    assert a.pool_ids == b.pool_ids == c.pool_ids
    # an id always points at the same image and label
    pos = a.index_of(a.pool_ids[::97])
    pos_c = c.index_of(a.pool_ids[::97])
    assert torch.equal(a.pool_images[pos], c.pool_images[pos_c])
    assert torch.equal(a.pool_labels[pos], c.pool_labels[pos_c])


def test_index_of_unknown_id_raises(data_root):
    data = load_dataset(data_root, "digits")
    with pytest.raises(DataError):
        data.index_of([data.pool_ids[0], "digits-99999"])


def test_imbalance_ratio_gives_exponential_profile_and_keeps_test_set(data_root):
    balanced = load_dataset(data_root, "digits")
    imbalanced = load_dataset(data_root, "digits", imbalance_ratio=10)
    balanced_counts = Counter(balanced.pool_labels.tolist())
    counts = Counter(imbalanced.pool_labels.tolist())
    n_max = min(balanced_counts.values())
    C = 10
    expected = [max(1, int(n_max * (1 / 10) ** (c / (C - 1)))) for c in range(C)]
    assert [counts[c] for c in range(C)] == expected
    assert expected[0] == n_max and expected[-1] == int(n_max / 10)
    assert all(expected[c] >= expected[c + 1] for c in range(C - 1))
    # the pool is a subset of the balanced pool, ids still pointing at the same samples
    assert set(imbalanced.pool_ids) <= set(balanced.pool_ids)
    pos = balanced.index_of(imbalanced.pool_ids)
    assert torch.equal(balanced.pool_labels[pos], imbalanced.pool_labels)
    assert torch.equal(balanced.pool_images[pos], imbalanced.pool_images[:])
    # the test set is untouched
    assert torch.equal(imbalanced.test_images, balanced.test_images)
    assert torch.equal(imbalanced.test_labels, balanced.test_labels)
    # and the imbalanced pool is reproducible
    again = load_dataset(data_root, "digits", imbalance_ratio=10)
    assert again.pool_ids == imbalanced.pool_ids
