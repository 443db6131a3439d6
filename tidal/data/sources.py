"""Dataset sources behind one registry.

A source writes its data under `data_root/<name>/` (materialize) and reads it back as uint8
tensors with a stable string id per sample (load). The directory is what DVC pins, so
materializing must be byte-for-byte deterministic: the same files give the same md5 as the
committed `data.dvc`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class DataError(ValueError):
    """Data that is missing or unusable; the message says where and what to do."""


@dataclass
class Dataset:
    """A pool to query from and a fixed test split, as uint8 images N×C×H×W."""

    name: str
    classes: list[str]
    pool_ids: list[str]
    pool_images: torch.Tensor
    pool_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.pool_images.shape[1])

    def index_of(self, ids: list[str]) -> torch.Tensor:
        """Positions of the given ids in the pool arrays (raises on an unknown id)."""
        lookup = self._lookup()
        missing = [i for i in ids if i not in lookup]
        if missing:
            raise DataError(f"{len(missing)} id(s) are not in the {self.name} pool, e.g. {missing[:3]}")
        return torch.tensor([lookup[i] for i in ids], dtype=torch.long)

    def _lookup(self) -> dict[str, int]:
        if not hasattr(self, "_id_lookup"):
            self._id_lookup = {sid: pos for pos, sid in enumerate(self.pool_ids)}
        return self._id_lookup


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask selecting round(test_fraction * n_c) samples of every class c."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen = rng.permutation(members)[: int(round(test_fraction * len(members)))]
        mask[chosen] = True
    return mask


def imbalanced_indices(labels: np.ndarray, ratio: float, num_classes: int, seed: int) -> np.ndarray:
    """The paper's exponential profile: keep n_c = n_max * (1/ratio)^(c/(C-1)) of class c."""
    if ratio <= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    n_max = min(int((labels == c).sum()) for c in range(num_classes))
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n_c = max(1, int(n_max * (1.0 / ratio) ** (c / (num_classes - 1))))
        keep.append(np.sort(rng.permutation(members)[:n_c]))
    return np.sort(np.concatenate(keep))


# --- digits: real handwritten digits shipped inside scikit-learn (no network) -------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _materialize_digits(dest: Path) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the full uint8 range like every other image source.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    is_test = stratified_test_mask(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "images.npy", images)
    np.save(dest / "labels.npy", labels)
    np.save(dest / "is_test.npy", is_test)


def _load_npy_dir(name: str, src: Path, classes: list[str]) -> Dataset:
    images = np.load(src / "images.npy")
    labels = np.load(src / "labels.npy")
    is_test = np.load(src / "is_test.npy")
    ids = np.array([f"{name}-{i:05d}" for i in range(len(labels))])
    pool = ~is_test
    return Dataset(
        name=name,
        classes=classes,
        pool_ids=ids[pool].tolist(),
        pool_images=torch.from_numpy(images[pool]),
        pool_labels=torch.from_numpy(labels[pool]),
        test_images=torch.from_numpy(images[is_test]),
        test_labels=torch.from_numpy(labels[is_test]),
    )


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[str, ...]
    write: Callable[[Path], None]
    read: Callable[[Path], Dataset]


SOURCES: dict[str, Source] = {
    "digits": Source(
        name="digits",
        files=("images.npy", "labels.npy", "is_test.npy"),
        write=_materialize_digits,
        read=lambda src: _load_npy_dir("digits", src, [str(d) for d in range(10)]),
    ),
}


def dataset_dir(data_root: str | Path, dataset: str) -> Path:
    return Path(data_root) / dataset


def materialize(data_root: str | Path, dataset: str) -> Path:
    """Write the dataset's files under data_root/<dataset> if any is missing; return the dir."""
    source = SOURCES[dataset]
    dest = dataset_dir(data_root, dataset)
    if not all((dest / f).is_file() for f in source.files):
        source.write(dest)
    return dest


def load_dataset(data_root: str | Path, dataset: str, imbalance_ratio: float = 1.0,
                 seed: int = 0) -> Dataset:
    """Read a materialized dataset; imbalance (if any) is applied to the pool only."""
    source = SOURCES[dataset]
    src = dataset_dir(data_root, dataset)
    missing = [f for f in source.files if not (src / f).is_file()]
    if missing:
        raise DataError(f"dataset '{dataset}' is missing {missing} under {src}; "
                        f"run `tidal data` (or `tidal run`) to write it")
    data = source.read(src)
    if imbalance_ratio > 1:
        keep = imbalanced_indices(data.pool_labels.numpy(), imbalance_ratio, data.num_classes, seed)
        data = Dataset(data.name, data.classes, [data.pool_ids[i] for i in keep],
                       data.pool_images[keep], data.pool_labels[keep], data.test_images, data.test_labels)
    return data
