"""Dataset sources behind one registry.

A source reads its data under `data_root/<name>/` (or data_root itself, for image folders and
manifests) as uint8 tensors N×C×H×W with a stable string id per pool sample. Sources:

- `digits`: written by us (materialize) under data_root/digits; the directory is what DVC pins,
  so materializing is byte-for-byte deterministic (the md5 in the committed `data.dvc`).
- `cifar10`, `cifar100`, `fashion-mnist`, `mnist`, `svhn`: torchvision's files under
  data_root/<name>, read with download=False. Missing files are a DataError that names the
  path and the command to fetch them on a machine with network; nothing is ever downloaded.
  Pool = the official train split, test = the official test split; ids `cifar10-train-00042`.
- `imagefolder`, `manifest`: image files, read by tidal.data.image_sources.
- `npy`: pre-decoded arrays data_root/{pool_images,pool_labels,test_images,test_labels}.npy,
  memory-mapped (see read_npy): a pool of millions of images is read only where it is used.

The data set they give, and its imbalanced and validation views, is tidal.data.dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tidal.data.dataset import UNLABELED, Dataset, PositionalIds, imbalanced, stratified_test_mask
from tidal.data.errors import DataError
from tidal.data.image_sources import MANIFEST_CLASSES, MANIFEST_CSV, ImageOptions, read_imagefolder, read_manifest


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


# --- torchvision datasets: read from data_root/<name>, never downloaded ---------------------

@dataclass(frozen=True)
class _Torchvision:
    cls: str                     # torchvision.datasets class name
    files: tuple[str, ...]       # what download=True leaves under the root (both splits)
    split_kw: bool = False       # SVHN takes split="train"/"test" instead of train=True/False

    def fetch_command(self, root: Path) -> str:
        if self.split_kw:
            calls = "; ".join(f"torchvision.datasets.{self.cls}('{root}', split='{s}', download=True)"
                              for s in ("train", "test"))
        else:  # one download holds both splits
            calls = f"torchvision.datasets.{self.cls}('{root}', download=True)"
        return f'python -c "import torchvision; {calls}"'


def _mnist_raw(folder: str) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{stem}-{kind}-idx{n}-ubyte" for stem in ("train", "t10k")
                 for kind, n in (("images", 3), ("labels", 1)))


TORCHVISION: dict[str, _Torchvision] = {
    "cifar10": _Torchvision("CIFAR10", tuple(f"cifar-10-batches-py/{f}" for f in (
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"))),
    "cifar100": _Torchvision("CIFAR100", tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta"))),
    "fashion-mnist": _Torchvision("FashionMNIST", _mnist_raw("FashionMNIST")),
    "mnist": _Torchvision("MNIST", _mnist_raw("MNIST")),
    "svhn": _Torchvision("SVHN", ("train_32x32.mat", "test_32x32.mat"), split_kw=True),
}


def _torchvision_hint(name: str, root: Path) -> str:
    return (f"fetch it on a machine with network access with\n  {TORCHVISION[name].fetch_command(root)}\n"
            f"and copy {root}/ here (tidal never downloads data)")


def _torchvision_split(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torchvision

    spec = TORCHVISION[name]
    split = {"split": "train" if train else "test"} if spec.split_kw else {"train": train}
    try:
        ds = getattr(torchvision.datasets, spec.cls)(str(root), download=False, **split)
    except RuntimeError as err:  # torchvision's "not found or corrupted" (md5 check failed)
        raise DataError(f"dataset '{name}' under {root} is unreadable ({err}); "
                        f"{_torchvision_hint(name, root)}") from None
    data = ds.data
    images = data if torch.is_tensor(data) else torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    if images.ndim == 3:                      # MNIST-like: N×H×W
        images = images[:, None]
    elif images.shape[-1] == 3:               # CIFAR: N×H×W×C
        images = images.permute(0, 3, 1, 2)
    # (SVHN is already N×C×H×W)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    classes = [str(c) for c in getattr(ds, "classes", [])] or [str(d) for d in range(10)]
    return images.contiguous(), labels, classes


def _read_torchvision(name: str, root: Path) -> Dataset:
    pool_images, pool_labels, classes = _torchvision_split(name, root, train=True)
    test_images, test_labels, _ = _torchvision_split(name, root, train=False)
    return Dataset(name, classes, [f"{name}-train-{i:05d}" for i in range(len(pool_labels))],
                   pool_images, pool_labels, test_images, test_labels)


# --- npy: pre-decoded arrays, memory-mapped --------------------------------------------------

NPY_FILES = ("pool_images.npy", "pool_labels.npy", "test_images.npy", "test_labels.npy")
NPY_ID_PREFIX = "npy"
_LABEL_CHUNK = 1 << 20  # labels checked a million at a time, so the check holds 8 MB at most


def _open_npy(path: Path, dtype: np.dtype, ndim: int, what: str) -> np.memmap:
    """Memory-map one array and check its dtype and rank; the error names the file.

    Copy-on-write ("c"), not read-only: torch.from_numpy then shares the mapping without a
    copy or a warning, and a stray in-place write stays in this process, never in the file.
    Nothing is read from disk until a row is used.
    """
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err}); expected {what}") from None
    if array.dtype != dtype or array.ndim != ndim:
        raise DataError(f"{path} holds {array.dtype} with shape {array.shape}; expected {what}")
    if not array.flags.c_contiguous:
        raise DataError(f"{path} is stored in Fortran order; expected {what} in C order "
                        f"(np.save(path, np.ascontiguousarray(array)))")
    return array


def _label_range(labels: np.ndarray) -> tuple[int, int]:
    """(min, max) of a label array, read a chunk at a time."""
    low, high = 0, -1
    for start in range(0, len(labels), _LABEL_CHUNK):
        chunk = labels[start:start + _LABEL_CHUNK]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    return low, high


def read_npy(root: Path, options: ImageOptions = ImageOptions()) -> Dataset:
    """root/pool_images.npy (N×C×H×W uint8), pool_labels.npy (N int64; -1 = unlabeled),
    test_images.npy (M×C×H×W uint8, same C×H×W) and test_labels.npy (M int64, all labeled).

    The arrays are memory-mapped, not loaded; ids are `npy-<position>` (`npy-0000042`), stable
    as long as the files keep their row order; classes are the label numbers `0`..`max label`.
    """
    images_spec = "uint8 images N×C×H×W (np.save of an array of shape (N, C, H, W), dtype uint8)"
    labels_spec = "int64 labels, one per image (np.save of an int64 array of shape (N,))"
    paths = {name: root / name for name in NPY_FILES}
    pool_images = _open_npy(paths["pool_images.npy"], np.dtype(np.uint8), 4, images_spec)
    test_images = _open_npy(paths["test_images.npy"], np.dtype(np.uint8), 4, images_spec)
    pool_labels = _open_npy(paths["pool_labels.npy"], np.dtype(np.int64), 1, labels_spec)
    test_labels = _open_npy(paths["test_labels.npy"], np.dtype(np.int64), 1, labels_spec)
    if test_images.shape[1:] != pool_images.shape[1:]:
        raise DataError(f"{paths['test_images.npy']} holds images of shape C×H×W={test_images.shape[1:]}, "
                        f"{paths['pool_images.npy']} of {pool_images.shape[1:]}; both splits need the same")
    for images, labels, name in ((pool_images, pool_labels, "pool"), (test_images, test_labels, "test")):
        if len(images) == 0:
            raise DataError(f"{paths[f'{name}_images.npy']} holds no images")
        if len(labels) != len(images):
            raise DataError(f"{paths[f'{name}_labels.npy']} holds {len(labels)} labels for the "
                            f"{len(images)} images of {paths[f'{name}_images.npy']}; expected one per image")
    pool_low, pool_high = _label_range(pool_labels)
    test_low, test_high = _label_range(test_labels)
    if pool_low < UNLABELED:
        raise DataError(f"{paths['pool_labels.npy']} holds the label {pool_low}; labels are class numbers "
                        f"0, 1, ... or {UNLABELED} for an unlabeled pool sample")
    if test_low < 0:
        raise DataError(f"{paths['test_labels.npy']} holds the label {test_low}; every test sample needs "
                        f"a class number 0, 1, ...")
    classes = [str(c) for c in range(max(pool_high, test_high) + 1)]
    data = Dataset("npy", classes, PositionalIds(NPY_ID_PREFIX, len(pool_images)),
                   torch.from_numpy(pool_images), torch.from_numpy(pool_labels),
                   torch.from_numpy(test_images), torch.from_numpy(test_labels),
                   mapped=(pool_images, pool_labels, test_images, test_labels))
    data.release_pages()  # the label pages the checks above read
    return data


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """name; files: what must exist in the dataset dir; write: writes them (None: external data
    we never fetch); read(dir, image options); in_root: the dataset dir is data_root itself;
    hint(dir): what to do when files are missing; image_files: decoded from image files, so the
    image options apply."""

    name: str
    files: tuple[str, ...]
    write: Callable[[Path], None] | None
    read: Callable[[Path, ImageOptions], Dataset]
    in_root: bool = False
    hint: Callable[[Path], str] | None = None
    image_files: bool = False


def _imagefolder_hint(root: Path) -> str:
    return (f"put the images at {root}/train/<class>/<image> and {root}/test/<class>/<image> "
            f"(e.g. `mkdir -p {root} && tar xzf cifar10-jpg.tar.gz -C {root} --strip-components=1`)")


def _manifest_hint(root: Path) -> str:
    return (f"write {root}/{MANIFEST_CSV} (header path,label,split; paths relative to {root}; empty "
            f"label = unlabeled; split train or test) and {root}/{MANIFEST_CLASSES} (one class per line)")


def _npy_hint(root: Path) -> str:
    return (f"write {', '.join(f'{root}/{f}' for f in NPY_FILES)} with np.save: uint8 images N×C×H×W and "
            f"int64 labels (-1 = unlabeled pool sample)")


SOURCES: dict[str, Source] = {
    "digits": Source(
        name="digits",
        files=("images.npy", "labels.npy", "is_test.npy"),
        write=_materialize_digits,
        read=lambda src, options=None: _load_npy_dir("digits", src, [str(d) for d in range(10)]),
    ),
    **{name: Source(name=name, files=spec.files, write=None,
                    read=lambda src, options=None, name=name: _read_torchvision(name, src),
                    hint=lambda root, name=name: _torchvision_hint(name, root))
       for name, spec in TORCHVISION.items()},
    "imagefolder": Source(name="imagefolder", files=("train", "test"), write=None, read=read_imagefolder,
                          in_root=True, hint=_imagefolder_hint, image_files=True),
    "manifest": Source(name="manifest", files=(MANIFEST_CSV, MANIFEST_CLASSES), write=None, read=read_manifest,
                       in_root=True, hint=_manifest_hint, image_files=True),
    "npy": Source(name="npy", files=NPY_FILES, write=None, read=read_npy, in_root=True, hint=_npy_hint),
}


def dataset_dir(data_root: str | Path, dataset: str) -> Path:
    return Path(data_root) if SOURCES[dataset].in_root else Path(data_root) / dataset


def _missing(source: Source, src: Path) -> list[str]:
    return [f for f in source.files if not (src / f).exists()]


def _missing_error(source: Source, src: Path, missing: list[str]) -> DataError:
    todo = source.hint(src) if source.hint else "run `tidal data` (or `tidal run`) to write it"
    return DataError(f"dataset '{source.name}' is missing {missing} under {src}; {todo}")


def materialize(data_root: str | Path, dataset: str) -> Path:
    """Write the dataset's files under its dir if any is missing; return the dir.

    External sources (write=None) are only checked: missing files raise DataError at once.
    """
    source = SOURCES[dataset]
    dest = dataset_dir(data_root, dataset)
    missing = _missing(source, dest)
    if missing:
        if source.write is None:
            raise _missing_error(source, dest, missing)
        source.write(dest)
    return dest


def load_dataset(data_root: str | Path, dataset: str, imbalance_ratio: float = 1.0,
                 seed: int = 0, cache_dir: str | Path | None = None, images: ImageOptions | None = None) -> Dataset:
    """Read a materialized dataset; imbalance (if any) is applied to the pool only.

    images: how image-file sources decode (default: their own size, refuse bad files).
    cache_dir: where decoded image-file sources keep their cache (default $TIDAL_CACHE_DIR or
    .cache/tidal, outside data_root; see tidal.data.cache); it overrides images.cache_dir.
    """
    from dataclasses import replace

    source = SOURCES[dataset]
    src = dataset_dir(data_root, dataset)
    missing = _missing(source, src)
    if missing:
        raise _missing_error(source, src, missing)
    options = images or ImageOptions()
    if cache_dir is not None:
        options = replace(options, cache_dir=cache_dir)
    data = source.read(src, options)
    if data.num_classes < 2:
        raise DataError(f"'{dataset}' under {src} has {data.num_classes} class ({data.classes}); a classifier "
                        f"needs at least two classes to learn anything")
    return imbalanced(data, imbalance_ratio, seed, where=f"'{dataset}' under {src}")
