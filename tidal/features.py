"""A frozen backbone's features of every image, computed once into a memory-mapped cache.

With `train.backbone_mode: frozen` the backbone never changes, so what every cycle's head, TD
module and scoring read from it (each stage's feature map, global-average-pooled, concatenated:
tidal.models.frozen.pooled_stages) is computed once per (images, architecture, weights, input
size) and kept on disk under the cache dir as one float32 array per split,
`features/<key>.f32`, described by `features/<key>.json`.

Extraction is resumable: rows are written batch by batch into `<key>.f32.partial`, and
`<key>.progress` records how many are done after each flushed batch, so a killed extraction
starts again where it stopped. The finished array is renamed into place and its JSON written
last: an entry without its JSON, or of the wrong size, is never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tidal.data.cache import cache_dir
from tidal.faults import failpoint
from tidal.models.frozen import pooled_stages
from tidal.progress import progress
from tidal.train import model_input, precision_context, prepare_input, prepare_model
from tidal.workspace import atomic_write_text

FEATURES_FORMAT = 1


# file_digest's results in this process, by what would change with the file's bytes: every step
# that reads frozen features names them by the weights' digest, and Lite0's file is 17 MB.
_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the weights a frozen backbone was given), read once per process
    unless the file changed (another inode, size or modification time)."""
    st = os.stat(path)
    key = (str(Path(path).absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def images_identity(images: torch.Tensor, mapped: tuple = ()) -> str:
    """What identifies a split's pixels: for a view into a memory-mapped cache file (named by what
    was decoded, tidal.data.cache), that file and the view's place in it; else a hash of the
    pixels themselves (small in-memory pools, and subsets copied out of a pool)."""
    storage = images.untyped_storage().data_ptr()
    for array in mapped:
        if array.ctypes.data == storage:
            return json.dumps([str(array.filename), images.storage_offset(), list(images.shape)])
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def features_key(arch: str, weights_digest: str, pixels: str, split: str) -> str:
    payload = json.dumps({"format": FEATURES_FORMAT, "arch": arch, "weights": weights_digest, "pixels": pixels,
                          "split": split}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def extract_features(make_backbone: Callable[[], nn.Module], images: torch.Tensor, key: str, device: torch.device,
                     batch_size: int = 256, directory: str | Path | None = None, desc: str = "features"
                     ) -> np.ndarray:
    """The pooled stage features of every image (N × sum(stage_channels), float32, memory-mapped),
    from the cache, or computed now (resuming an interrupted extraction). The backbone is built
    (`make_backbone()`, weights loaded) only when something is left to compute."""
    folder = cache_dir(directory) / "features"
    final, meta_path = folder / f"{key}.f32", folder / f"{key}.json"
    cached = _open(final, meta_path, None, len(images))
    if cached is not None:
        return cached
    backbone = make_backbone()
    shape = (len(images), sum(backbone.stage_channels))
    folder.mkdir(parents=True, exist_ok=True)
    partial, progress_path = folder / f"{key}.f32.partial", folder / f"{key}.progress"
    done = _resumable_rows(partial, progress_path, shape)
    if done == 0:
        with open(partial, "wb") as fh:
            fh.truncate(math.prod(shape) * 4)
    if len(images):
        out = np.memmap(partial, dtype=np.float32, mode="r+", shape=shape)
        net = prepare_model(backbone.eval(), device)
        starts = range(done, len(images), batch_size)
        with torch.inference_mode():
            for start in progress(starts, desc=desc, total=len(starts), unit="batch"):
                x = prepare_input(model_input(images[start:start + batch_size].to(device)), device)
                with precision_context(device):
                    _, stages = net(x)
                out[start:start + len(x)] = pooled_stages(stages).float().cpu().numpy()
                out.flush()  # the rows reach the file before the progress that counts them
                atomic_write_text(progress_path, json.dumps({"done": start + len(x), "shape": list(shape)}))
                failpoint("features:batch")
        del out
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, final)
    atomic_write_text(meta_path, json.dumps({"format": FEATURES_FORMAT, "shape": list(shape)}))
    progress_path.unlink(missing_ok=True)
    result = _open(final, meta_path, shape, len(images))
    assert result is not None
    return result


def _open(path: Path, meta_path: Path, shape: tuple[int, int] | None, rows: int) -> np.ndarray | None:
    """The finished entry, when its JSON says `rows` rows (and `shape`, when given) and the file
    has exactly that size; else None."""
    try:
        meta = json.loads(meta_path.read_text())
        found = tuple(int(d) for d in meta["shape"])
        if found[0] != rows or (shape is not None and found != shape) or path.stat().st_size != math.prod(found) * 4:
            return None
        shape = (found[0], found[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if not math.prod(shape):
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="c", shape=shape)


def _resumable_rows(partial: Path, progress_path: Path, shape: tuple[int, int]) -> int:
    """Rows an interrupted extraction finished, when its files fit this one; else 0."""
    try:
        record = json.loads(progress_path.read_text())
        if tuple(record["shape"]) == shape and partial.stat().st_size == math.prod(shape) * 4:
            return int(record["done"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0
