"""The sources read from image files: an image folder and a manifest, and how their files decode.

- `imagefolder`: data_root/{train,test}/<class>/<file> (or in subfolders of <class>); classes
  sorted by folder name; ids are the relative path without extension (`train/cat/0042`).
- `manifest`: data_root/manifest.csv with columns `path,label,split` (see read_manifest) and
  data_root/classes.txt declaring the classes.

Image files are decoded once, in parallel, into a memory-mapped cache on disk keyed by their
paths, sizes and mtimes and the size they are brought to (tidal.data.cache, tidal.data.decode);
`ImageOptions` says how (the params keys image_size, resize and bad_images).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tidal.data.cache import IMAGE_SUFFIXES, DecodedPool, bad_images_error, decoded_pool, file_stat_entry
from tidal.data.dataset import UNLABELED, Dataset
from tidal.data.errors import DataError
from tidal.data.listing import ListedNames, duplicate_stem, list_folders


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
