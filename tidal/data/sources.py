"""Dataset sources behind one registry.

A source reads its data under `data_root/<name>/` (or data_root itself, for image folders and
manifests) as uint8 tensors N×C×H×W with a stable string id per pool sample. Sources:

- `digits`: written by us (materialize) under data_root/digits; the directory is what DVC pins,
  so materializing is byte-for-byte deterministic (the md5 in the committed `data.dvc`).
- `cifar10`, `cifar100`, `fashion-mnist`, `mnist`, `svhn`: torchvision's files under
  data_root/<name>, read with download=False. Missing files are a DataError that names the
  path and the command to fetch them on a machine with network; nothing is ever downloaded.
  Pool = the official train split, test = the official test split; ids `cifar10-train-00042`.
- `imagefolder`: data_root/{train,test}/<class>/<file>; classes sorted by folder name; ids
  are the relative path without extension (`train/cat/0042`).
- `manifest`: data_root/manifest.csv with columns `path,label,split` (see read_manifest) and
  data_root/classes.txt declaring the classes.
- `npy`: pre-decoded arrays data_root/{pool_images,pool_labels,test_images,test_labels}.npy,
  memory-mapped (see read_npy): a pool of millions of images is read only where it is used.

Image files are decoded once, in parallel, into a memory-mapped cache on disk keyed by their
paths, sizes and mtimes and the size they are brought to (tidal.data.cache, tidal.data.decode);
`ImageOptions` says how (the params keys image_size, resize and bad_images).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tidal.data.cache import IMAGE_SUFFIXES, DecodedPool, bad_images_error, decoded_pool, file_stat_entry
from tidal.data.errors import DataError
from tidal.data.listing import ListedNames, MadeNames, duplicate_stem, list_folders


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
    pool_images: torch.Tensor
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

UNLABELED = -1  # pool label of a sample without a label (manifest rows with an empty label)


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


# --- image files: how they are decoded ---------------------------------------------------------

BAD_IMAGE_POLICIES = ("refuse", "skip")


@dataclass(frozen=True)
class ImageOptions:
    """How image-file sources decode (params keys image_size, resize, bad_images).

    size 0: every image keeps its own size, which must then be one size for all; otherwise each
    image is brought to size×size by `resize` (tidal.data.decode.RESIZE_POLICIES). bad_images:
    "refuse" (one error listing every file that cannot be decoded) or "skip" (leave them out).
    """

    size: int = 0
    resize: str = "center-crop"
    bad_images: str = "refuse"
    cache_dir: str | Path | None = None

    @classmethod
    def from_params(cls, params: dict, cache_dir: str | Path | None = None) -> "ImageOptions":
        return cls(params["image_size"], params["resize"], params["bad_images"], cache_dir)


def _decoded_split(source: str, files: Sequence[str], key_entries: list, describe: Callable[[int], str],
                   options: ImageOptions) -> tuple[DecodedPool, np.ndarray | range, tuple[tuple[str, str], ...]]:
    """The decoded images, the indices of the files behind their rows (a range when every file
    was decoded: no array of a million indices), and the files skipped."""
    pool = decoded_pool(source, files, key_entries, describe, options.size, options.resize, options.cache_dir)
    if pool.bad and options.bad_images == "refuse":
        raise bad_images_error(pool, len(files), describe)
    kept = pool.kept(len(files)) if pool.bad else range(len(files))
    return pool, kept, tuple((str(files[i]), reason) for i, reason in pool.bad)


def _mapped(pool: DecodedPool) -> tuple[np.memmap, ...]:
    return (pool.images,) if isinstance(pool.images, np.memmap) else ()


# --- imagefolder: data_root/{train,test}/<class>/<image> -------------------------------------

def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def read_imagefolder(root: Path, options: ImageOptions = ImageOptions()) -> Dataset:
    """Pool = root/train, test = root/test; class c = c-th class folder of train, sorted by name.

    Every class folder of train/ needs an image (a class without one could never be learned).
    The files are listed compactly (tidal.data.listing): ids and paths are made when asked for.
    """
    root = Path(os.path.abspath(root))  # so each listed path is absolute already
    train_dir, test_dir = root / "train", root / "test"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image files>")
    if len(classes) < 2:
        raise DataError(f"{train_dir} has one class folder ({classes[0]}); a classifier needs at least two "
                        f"classes: expected {train_dir}/<class>/<image files> for each class")
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and _visible(p) and p.name not in classes)
    if unknown:
        raise DataError(f"{test_dir} has class folder(s) {unknown} that {train_dir} lacks; "
                        f"the classes are the folders of train/: {classes}")
    folders = [(split, name) for split in ("train", "test") for name in classes]
    listing = list_folders(str(root), folders, list(range(len(classes))) * 2, IMAGE_SUFFIXES)
    per_folder = np.diff(listing.starts)
    empty = [name for c, name in enumerate(classes) if per_folder[c] == 0]
    if empty:
        raise DataError(f"class folder(s) {[str(train_dir / e) for e in empty]} hold no images: a class "
                        f"without training images can never be learned; add images or remove the folder")
    n_train = int(per_folder[:len(classes)].sum())
    if n_train == len(listing):
        raise DataError(f"{test_dir} holds no images; expected {test_dir}/<class>/<image files>")
    dup = duplicate_stem(listing)
    if dup is not None:
        raise DataError(f"two images under {root} share the id '{dup}' (same name, different extension); "
                        f"rename one")
    every = ListedNames(listing, range(len(listing)), "file")
    pool, kept, skipped = _decoded_split("imagefolder", every, [listing.digest], lambda i: every[i], options)
    n = n_train if isinstance(kept, range) else int((kept < n_train).sum())
    images = torch.from_numpy(pool.images)
    label_t = torch.from_numpy(listing.row_labels(kept))
    return Dataset("imagefolder", classes, ListedNames(listing, kept[:n], "id"), images[:n], label_t[:n],
                   images[n:], label_t[n:], ListedNames(listing, kept[:n], "file"), mapped=_mapped(pool),
                   skipped=skipped)


# --- manifest: a CSV of path,label,split plus classes.txt -------------------------------------

MANIFEST_CSV = "manifest.csv"
MANIFEST_CLASSES = "classes.txt"
MANIFEST_SPLITS = ("train", "test")


def _inside(root: Path, text: str) -> Path | None:
    """root/text if text is a relative path without `..`, else None.

    The rule is on the text the manifest holds: an absolute path or `..` is refused, since a
    manifest is data that may come from elsewhere. A symlink inside root is followed, wherever
    it points: whoever can put a link in the data root chose that target (the usual way to keep
    images on another disk), and the data version hashes the linked files too.
    """
    from pathlib import PurePosixPath, PureWindowsPath

    rel = PurePosixPath(text.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(text).drive or ".." in rel.parts or not rel.parts:
        return None
    return root / rel


def read_manifest(root: Path, options: ImageOptions = ImageOptions()) -> Dataset:
    """root/manifest.csv with header `path,label,split`, and root/classes.txt (one class per line).

    path: an image file relative to root (no absolute paths, no `..`); label: a class name from
    classes.txt, or empty for an unlabeled pool sample (pool label UNLABELED); split: `train`
    (the pool) or `test` (must be labeled). Ids are the path without extension.
    """
    import csv

    csv_path, classes_path = root / MANIFEST_CSV, root / MANIFEST_CLASSES
    classes = [line.strip() for line in classes_path.read_text().splitlines() if line.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"{classes_path} must list each class once, one per line (got {classes})")
    class_index = {c: i for i, c in enumerate(classes)}
    rows: list[tuple[int, str, Path, int, str]] = []  # (line, path text, path, label, split)
    seen: dict[str, int] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if not {"path", "label", "split"} <= set(header):
            raise DataError(f"{csv_path} line 1: the header must name the columns path,label,split; got {header}")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            text = (row.get("path") or "").strip()
            where = f"{csv_path} line {line}, path '{text}'"
            path = _inside(root, text)
            if path is None:
                raise DataError(f"{where}: the path must be relative to {root}, without '..' (a symlink "
                                f"inside {root} may point elsewhere)")
            split = (row.get("split") or "").strip()
            if split not in MANIFEST_SPLITS:
                raise DataError(f"{where}: split must be one of {list(MANIFEST_SPLITS)}, got '{split}'")
            label_text = (row.get("label") or "").strip()
            if label_text == "":
                if split == "test":
                    raise DataError(f"{where}: a test sample needs a label")
                label = UNLABELED
            elif label_text in class_index:
                label = class_index[label_text]
            else:
                raise DataError(f"{where}: label '{label_text}' is not one of the classes in "
                                f"{classes_path}: {classes}")
            if not path.is_file():
                raise DataError(f"{where}: image file not found")
            sid = Path(text.replace("\\", "/")).with_suffix("").as_posix()
            if sid in seen:
                raise DataError(f"{where}: same id '{sid}' as line {seen[sid]} (a path listed twice, "
                                f"or the same name with another extension)")
            seen[sid] = line
            rows.append((line, text, path, label, split))
    for split in MANIFEST_SPLITS:
        if not any(r[4] == split for r in rows):
            raise DataError(f"{csv_path} has no row with split '{split}'; the pool and the test set "
                            f"both need samples")
    rows.sort(key=lambda r: r[4] == "test")  # pool rows first, each split in file order
    files = [r[2] for r in rows]
    entries = [file_stat_entry(p, r[1]) for p, r in zip(files, rows)]
    pool, kept, skipped = _decoded_split("manifest", [str(f) for f in files], entries,
                                         lambda i: f"{csv_path} line {rows[i][0]}, path '{rows[i][1]}'", options)
    rows = [rows[i] for i in kept]
    n = sum(r[4] == "train" for r in rows)
    images = torch.from_numpy(pool.images)
    labels = torch.tensor([r[3] for r in rows], dtype=torch.int64)
    ids = [Path(r[1].replace("\\", "/")).with_suffix("").as_posix() for r in rows[:n]]
    pool_files = [os.path.abspath(r[2]) for r in rows[:n]]
    return Dataset("manifest", classes, ids, images[:n], labels[:n], images[n:], labels[n:], pool_files,
                   mapped=_mapped(pool), skipped=skipped)


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
    return Dataset(data.name, data.classes, _take(data.pool_ids, keep), data.pool_images[keep_t],
                   data.pool_labels[keep_t], data.pool_images[held_t], data.pool_labels[held_t],
                   _take(data.pool_files, keep), skipped=data.skipped, image_shape=data.image_shape)


def _take(names: Sequence[str], positions: np.ndarray) -> Sequence[str]:
    """names[positions], as a view again where names is one (an image folder's ids and paths)."""
    if isinstance(names, ListedNames):
        return names.take(positions)
    return [names[i] for i in positions] if names else ()


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
    return replace(data, pool_ids=_take(data.pool_ids, keep), pool_images=data.pool_images[keep],
                   pool_labels=data.pool_labels[keep], pool_files=_take(data.pool_files, keep), mapped=())
