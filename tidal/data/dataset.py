"""The data set every step works on, and the views of it that keep the test split.

A `Dataset` is a pool to query from and a fixed test split, uint8 images N×C×H×W with a stable
string id per pool sample (tidal.data.sources reads them). The views: `imbalanced` (the paper's
exponential class imbalance on the pool) and `hold_out_validation` (a seeded validation split
of the pool in place of the test split), whose pools are `PoolRows` of the source's (rows read
when indexed, never copied whole); `stratified_test_mask` splits a source without one.
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tidal.data.errors import DataError
from tidal.data.listing import ListedNames, MadeNames

UNLABELED = -1  # pool label of a sample without a label (manifest rows with an empty label, npy's -1)


class PositionalIds(MadeNames):
    """The ids `<prefix>-<position>` (7+ digits) of a pool of n samples, made when asked for.

    A pool of a million samples then holds no list of a million strings (about 70 MB per
    process, plus a dict as large to look ids up), and an id's position is parsed, not looked up.
    """

    def __init__(self, prefix: str, n: int) -> None:
        self.prefix, self.n = prefix, n

    def __len__(self) -> int:
        return self.n

    def _name(self, i: int) -> str:
        return self._format(i)

    def _format(self, i: int) -> str:
        return f"{self.prefix}-{i:07d}"

    def position(self, sid: str) -> int | None:
        """The position of `sid`, or None when it is not an id of this pool (only the canonical
        spelling counts: `npy-0000042`, not `npy-42`)."""
        head, _, digits = sid.rpartition("-")
        if head != self.prefix or not digits.isdigit():
            return None
        i = int(digits)
        return i if i < self.n and self._format(i) == sid else None


class PoolRows:
    """Rows `positions` of `images` (N×C×H×W), gathered only when indexed: `rows[k]` is
    `images[positions[k]]`, for an int, a slice or a tensor of positions.

    What the views below keep of a pool: a copy of every kept row of a memory-mapped pool would
    read all of it into this process's memory (150 GB for a million photos at 224 px), while
    every step reads a pool by rows anyway (the labeled set, a batch of candidates)."""

    def __init__(self, images: torch.Tensor, positions: torch.Tensor) -> None:
        self.images, self.positions = images, positions

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.positions), *self.images.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, rows: int | slice | torch.Tensor) -> torch.Tensor:
        return self.images[self.positions[rows]]


def pool_rows(images: torch.Tensor | PoolRows, positions: np.ndarray) -> PoolRows:
    """`images[positions]` as a PoolRows of the underlying tensor (a view of a view stays one level)."""
    index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    if isinstance(images, PoolRows):
        return PoolRows(images.images, images.positions[index])
    return PoolRows(images, index)


@dataclass
class Dataset:
    """A pool to query from and a fixed test split, as uint8 images N×C×H×W.

    `pool_files`: each pool sample's image file (absolute path), for the annotators' query
    files; empty when the pool is not image files (digits, torchvision sets, npy).
    `mapped`: the memory-mapped arrays behind the tensors (npy source, decoded image files), for
    `release_pages`. `skipped`: (file, reason) of the image files left out (bad_images: skip).
    `image_shape`: C×H×W of the images, when pool_images holds their features instead.
    """

    name: str
    classes: list[str]
    pool_ids: Sequence[str]
    pool_images: torch.Tensor | PoolRows  # PoolRows in the views (imbalanced, validation split)
    pool_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    pool_files: Sequence[str] = field(default=(), repr=False)
    mapped: tuple[np.memmap, ...] = field(default=(), repr=False)
    skipped: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # C×H×W of the images when pool_images holds something else (a frozen backbone's features)
    image_shape: tuple[int, ...] = field(default=(), repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.pool_images.shape[1])

    def index_of(self, ids: list[str]) -> torch.Tensor:
        """Positions of the given ids in the pool arrays (raises on an unknown id)."""
        if isinstance(self.pool_ids, MadeNames):  # found without a dict of every id
            found = [self.pool_ids.position(i) for i in ids]
        else:
            lookup = self._lookup()
            found = [lookup.get(i) for i in ids]
        missing = [i for i, pos in zip(ids, found) if pos is None]
        if missing:
            raise DataError(f"{len(missing)} id(s) are not in the {self.name} pool, e.g. {missing[:3]}")
        return torch.tensor(found, dtype=torch.long)

    def _lookup(self) -> dict[str, int]:
        if not hasattr(self, "_id_lookup"):
            self._id_lookup = {sid: pos for pos, sid in enumerate(self.pool_ids)}
        return self._id_lookup

    def release_pages(self) -> None:
        """Let go of the memory-mapped pages read so far (npy source; nothing for the others).

        They stay in the OS page cache, so reading them again costs no disk access, but they stop
        counting in this process's resident memory: a process that gathers a huge pool batch by
        batch and calls this after each batch holds one batch, not every page it has touched.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):  # no madvise (Windows): the pages stay counted
            return
        for array in self.mapped:
            array._mmap.madvise(mmap.MADV_DONTNEED)  # numpy keeps the mmap object as `_mmap`


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


def imbalanced(data: Dataset, ratio: float, seed: int, where: str = "the pool") -> Dataset:
    """The data set with the paper's exponential class imbalance on its pool (ratio > 1), the
    test split untouched; the data set itself for ratio 1."""
    from dataclasses import replace

    if ratio <= 1:
        return data
    if bool((data.pool_labels == UNLABELED).any()):
        raise DataError(f"imbalance_ratio={ratio} needs a label for every pool sample, but {where} has "
                        f"unlabeled ones; use imbalance_ratio 1")
    keep = imbalanced_indices(data.pool_labels.numpy(), ratio, data.num_classes, seed)
    return replace(data, pool_ids=_take(data.pool_ids, keep), pool_images=pool_rows(data.pool_images, keep),
                   pool_labels=data.pool_labels[keep], pool_files=_take(data.pool_files, keep))


def hold_out_validation(data: Dataset, size: int, seed: int) -> Dataset:
    """The data set with `size` seeded random labeled pool samples as its test split, the rest as
    its pool: what settings are chosen on, so that choosing never reads the real test split.

    The draw depends on the seed and the pool only (numpy stream [seed, 1]; the initial set and
    candidates use other streams), so every strategy of one seed sees the same validation split.
    """
    known = (data.pool_labels >= 0).nonzero().flatten().numpy()
    if size >= len(known):
        raise DataError(f"validation_size={size} leaves no pool: '{data.name}' has {len(known)} labeled pool "
                        f"samples; choose fewer")
    held = np.sort(np.random.default_rng([seed, 1]).choice(known, size=size, replace=False))
    keep = np.setdiff1d(np.arange(len(data.pool_labels)), held)
    held_t, keep_t = torch.from_numpy(held), torch.from_numpy(keep)
    return Dataset(data.name, data.classes, _take(data.pool_ids, keep), pool_rows(data.pool_images, keep),
                   data.pool_labels[keep_t], data.pool_images[held_t], data.pool_labels[held_t],
                   _take(data.pool_files, keep), mapped=data.mapped, skipped=data.skipped,
                   image_shape=data.image_shape)


def _take(names: Sequence[str], positions: np.ndarray) -> Sequence[str]:
    """names[positions], as a view again where names is one (an image folder's ids and paths)."""
    if isinstance(names, ListedNames):
        return names.take(positions)
    return [names[i] for i in positions] if names else ()
