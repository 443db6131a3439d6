"""Decode image files once: a uint8 tensor cache keyed by what the source reads (paths, sizes, mtimes).

Image-file sources (imagefolder, manifest) decode every file with PIL on their first load and
save the result as one `.pt` (plain tensors and lists, so `torch.load(weights_only=True)` reads
it) under the cache dir. The key is a hash of what the source reads: every file's relative path,
size and mtime plus the source's own index files (manifest CSV, classes list), so changing,
adding or removing an image makes a new entry and the next load decodes again.

The cache lives OUTSIDE data_root (default `.cache/tidal/` in the working directory, or
$TIDAL_CACHE_DIR), so the DVC hash of data_root (tidal.data.version.dvc_dir_md5) never sees it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tidal.data.errors import DataError

CACHE_FORMAT = 1  # bump when the decoded layout changes, so old entries are not reused
DEFAULT_CACHE_DIR = Path(".cache") / "tidal"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L")


def cache_dir(explicit: str | Path | None = None) -> Path:
    """The explicit dir, else $TIDAL_CACHE_DIR, else `.cache/tidal` in the working directory."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("TIDAL_CACHE_DIR") or DEFAULT_CACHE_DIR)


def file_stat_entry(path: Path, relpath: str) -> list:
    st = path.stat()
    return [relpath, st.st_size, st.st_mtime_ns]


def data_key(source: str, entries: list, extra: dict[str, str] | None = None) -> str:
    """Hash of (source, format, [relpath, size, mtime_ns] of every file, extra digests)."""
    payload = json.dumps({"source": source, "format": CACHE_FORMAT, "files": entries, "extra": extra or {}},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# The entries this process loaded last, by file: every pipeline step loads the pool, and the
# scoring shards of a thread task runner load it at once; they share one copy instead of each
# reading its own (180 MB on CIFAR-10). Safe because the key hashes what the entry was built
# from; callers never write into the tensors.
MEMO_ENTRIES = 2
_memo: OrderedDict[Path, dict[str, Any]] = OrderedDict()
_memo_lock = threading.Lock()


def cached(source: str, key: str, build: Callable[[], dict[str, Any]],
           directory: str | Path | None = None) -> dict[str, Any]:
    """Load `<dir>/<source>-<key>.pt`, or build it (decode) and save it atomically; the last
    MEMO_ENTRIES entries stay in memory."""
    path = (cache_dir(directory) / f"{source}-{key}.pt").absolute()
    with _memo_lock:
        if path in _memo:
            _memo.move_to_end(path)
            return _memo[path]
        value = _load_or_build(path, build)
        _memo[path] = value
        while len(_memo) > MEMO_ENTRIES:
            _memo.popitem(last=False)
        return value


def _load_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: rebuild it rather than fail the run
            path.unlink(missing_ok=True)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def decode_images(paths: list[str] | list[Path], describe: Callable[[int], str]) -> torch.Tensor:
    """Decode image files into one uint8 N×C×H×W tensor (C=1 if every image is grayscale, else 3).

    `describe(i)` names file i in errors (e.g. its manifest row). Every image must have the size
    of the first; an unreadable or truncated file is a DataError.
    """
    from PIL import Image, UnidentifiedImageError

    arrays: list[np.ndarray] = []
    size = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
                im = im.convert("L" if im.mode in GRAY_MODES else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"{describe(i)}: image file not found") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"{describe(i)}: cannot decode image ({err}); replace or remove the file") from None
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != size:
            raise DataError(f"{describe(i)}: image is {arr.shape[1]}×{arr.shape[0]} but the first image is "
                            f"{size[1]}×{size[0]}; every image of a dataset must have the same size "
                            f"(resize them first)")
        arrays.append(arr)
    if not arrays:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    out = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]  # grayscale broadcasts to RGB
    return torch.from_numpy(out)
