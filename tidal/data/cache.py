"""Decode image files once, in parallel, into a memory-mapped uint8 array on disk.

Image-file sources (imagefolder, manifest) call `decoded_pool` on every load. The first call
for a given set of files and size decodes them in this process and forked helpers (all cores, a progress bar
with files/s and ETA) straight into one raw uint8 file N×C×H×W; every later call, in any
process (training, evaluation, scoring, Dask workers, DDP ranks), maps that file read-only
copy-on-write, so a process holds only the pages it touches, never the whole pool.

An entry is two files under the cache dir, named by a key that hashes what was read (every
file's relative path, size and mtime, the source's own index files, the image size and the
resize policy): `<source>-<key>.u8` (the pixels) and `<source>-<key>.json` (shape, and the
files that could not be decoded, with the reason). The pixels are written to a temporary file
and renamed into place, then the JSON is written atomically: an entry counts only when its JSON
exists and the pixel file has exactly the size it states, so a torn or interrupted build is
never read, and the next load builds it again from scratch.

The cache lives OUTSIDE data_root (default `.cache/tidal/` in the working directory, or
$TIDAL_CACHE_DIR), so the DVC hash of data_root (tidal.data.version.dvc_dir_md5) never sees it.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import queue
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from tidal.data.decode import GRAY_MODES, BadImage, decode, probe
from tidal.data.errors import DataError
from tidal.progress import progress
from tidal.workspace import atomic_write_text, pid_alive, write_csv

CACHE_FORMAT = 3  # bump when the decoded layout, or which files decode, changes: old entries are not reused
DEFAULT_CACHE_DIR = Path(".cache") / "tidal"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff")
# Starting a pool of workers costs about 0.05 s (benchmarks/photo_folders.md): the header pass
# (about 20,000 files/s in one process) goes to workers only for this many files, the decode pass
# (about 15 ms per megapixel decoded in full) only for this many source pixels in all.
PARALLEL_PROBE_FILES = 20_000
PARALLEL_DECODE_PIXELS = 10_000_000
CHUNK_FILES = 64  # at most; fewer, so that every worker gets about CHUNKS_PER_WORKER chunks
CHUNKS_PER_WORKER = 16


def cache_dir(explicit: str | Path | None = None) -> Path:
    """The explicit dir, else $TIDAL_CACHE_DIR, else `.cache/tidal` in the working directory."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("TIDAL_CACHE_DIR") or DEFAULT_CACHE_DIR)


def file_stat_entry(path: Path, relpath: str) -> list:
    st = path.stat()
    return [relpath, st.st_size, st.st_mtime_ns]


def data_key(source: str, entries: list, extra: dict | None = None) -> str:
    """Hash of (source, format, [relpath, size, mtime_ns] of every file, extra settings)."""
    payload = json.dumps({"source": source, "format": CACHE_FORMAT, "files": entries, "extra": extra or {}},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def decode_workers() -> int:
    """The cores this process may use (its CPU affinity, which a container or taskset limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodedPool:
    """The decoded images of the files that could be decoded, in file order, and the others.

    `images`: a read-only-on-disk memory map (copy-on-write), len(files) - len(bad) rows.
    `bad`: (file index, reason) of every file left out. `bad_list`: a CSV naming them all.
    """

    images: np.ndarray
    bad: list[tuple[int, str]]
    bad_list: Path

    def kept(self, n_files: int) -> np.ndarray:
        """The indices of the files behind `images`' rows."""
        mask = np.ones(n_files, dtype=bool)
        mask[[i for i, _ in self.bad]] = False
        return np.flatnonzero(mask)


def decoded_pool(source: str, files: Sequence[str], key_entries: list, describe: Callable[[int], str],
                 size: int = 0, resize: str = "center-crop", directory: str | Path | None = None,
                 workers: int | None = None) -> DecodedPool:
    """The cache entry for these files at this size, built first when missing.

    `key_entries`: what identifies the files' contents ([relpath, size, mtime_ns] each, plus the
    source's index files; or one digest of them, as tidal.data.listing makes). `describe(i)`
    names file i in messages. size 0 keeps the files' own size, which must then be the same for
    all: otherwise a DataError says to set `image_size`.
    """
    key = data_key(source, key_entries, {"image_size": size, "resize": resize if size else None})
    base = (cache_dir(directory) / f"{source}-{key}").absolute()
    entry = _open_entry(base)
    if entry is None:
        _build(base, files, describe, size, resize, decode_workers() if workers is None else workers)
        entry = _open_entry(base)
        if entry is None:
            raise DataError(f"the decoded-image cache {base}.u8 could not be read back after it was written; "
                            f"check the disk under {base.parent}")
    return entry


def _open_entry(base: Path) -> DecodedPool | None:
    meta_path, pixels = base.with_suffix(".json"), base.with_suffix(".u8")
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(d) for d in meta["shape"])
        if meta.get("format") != CACHE_FORMAT or pixels.stat().st_size != math.prod(shape):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    images = (np.memmap(pixels, dtype=np.uint8, mode="c", shape=shape) if math.prod(shape)
              else np.zeros(shape, dtype=np.uint8))  # numpy cannot map an empty file
    return DecodedPool(images, [(int(i), str(r)) for i, r in meta["bad"]], base.with_suffix(".bad.csv"))


# --- building an entry -------------------------------------------------------------------------

def probe_files(paths: list[str]) -> list[tuple[str, int, int] | str]:
    """`decode.probe` of each file: (mode, width, height), or why it is not an image."""
    out: list[tuple[str, int, int] | str] = []
    for path in paths:
        try:
            out.append(probe(path))
        except BadImage as err:
            out.append(str(err))
    return out


def _decode_chunk(task: tuple[str, tuple[int, ...], bool, int, str, list[tuple[int, str]]]) -> list[str | None]:
    """Decode (row, path) pairs into the rows of the memory-mapped file; None or the reason."""
    pixels, shape, gray, size, resize, rows = task
    target = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=shape)
    out: list[str | None] = []
    for row, path in rows:
        try:
            array = decode(path, gray, size, resize)
            if array.shape != shape[1:]:  # a header that lied about the size
                raise BadImage(f"decoded to {array.shape[2]}×{array.shape[1]}, its header said otherwise")
            target[row] = array
            out.append(None)
        except BadImage as err:
            out.append(str(err))
    del target  # no msync per chunk: the builder fsyncs the whole file once, at the end
    return out


def _chunks(items: Sequence, workers: int) -> list[list]:
    """Items in order, in chunks of at most CHUNK_FILES, small enough to share out evenly: with
    chunks taken one at a time, the last one finishes at most a chunk after the others."""
    n = max(1, min(CHUNK_FILES, math.ceil(len(items) / (CHUNKS_PER_WORKER * max(1, workers)))))
    return [items[i:i + n] for i in range(0, len(items), n)]


def _run(fn: Callable, chunks: list, workers: int, total: int, desc: str) -> Iterator:
    """fn over the chunks in `workers` processes, this one included; one result per file, in order."""
    return iter(progress(_results(fn, chunks, workers), desc=desc, total=total, unit="files"))


def _results(fn: Callable, chunks: list, workers: int) -> Iterator:
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from fn(chunk)
        return
    # This process works too, beside workers - 1 forked helpers: every process takes the next
    # chunk nobody has taken, so no core waits while another has work, and one process fewer is
    # forked (forking a process that has torch loaded is most of a small folder's overhead).
    # fork, not spawn or forkserver: those re-run the caller's main script in every worker,
    # which breaks (and respawns workers forever) in a script without an
    # `if __name__ == "__main__"` guard. The helpers only run Pillow and numpy.
    context = multiprocessing.get_context("fork")
    handed_out = context.Value("q", 0)
    finished = context.Queue()

    def take() -> int:
        with handed_out.get_lock():
            handed_out.value += 1
            return handed_out.value - 1

    def helper() -> None:
        try:
            while (i := take()) < len(chunks):
                finished.put((i, fn(chunks[i])))
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
            finished.put((-1, f"{type(err).__name__}: {err}"))

    helpers = [context.Process(target=helper, daemon=True) for _ in range(min(workers, len(chunks)) - 1)]
    for process in helpers:
        process.start()
    results: dict[int, list] = {}
    own_seconds: list[float] = []
    yielded = 0
    try:
        while yielded < len(chunks):
            i = take()
            if i >= len(chunks):
                # Nothing left to hand out: wait for the helpers' last chunks, but not forever. A
                # helper can die, or hang (a fork of a process with threads can inherit a lock
                # another thread held): after a few of this process's chunk times, it does the
                # first missing chunk itself. A chunk written twice writes the same bytes.
                wait = max(1.0, 4 * max(own_seconds, default=0.0))
                _collect(finished, results, timeout=wait)
                i = yielded
            if i not in results:
                began = time.perf_counter()
                results[i] = fn(chunks[i])
                own_seconds.append(time.perf_counter() - began)
            _collect(finished, results)
            while yielded in results:
                yield from results.pop(yielded)
                yielded += 1
    finally:
        for process in helpers:
            process.kill()  # done, or stuck: every result is in, or an error is on its way up
            process.join()
        finished.close()


def _collect(finished: "multiprocessing.Queue", results: dict[int, list], timeout: float = 0.0) -> None:
    """Move what the helpers sent into `results` (waiting up to `timeout` for the first of it);
    a helper's error is raised here."""
    while True:
        try:
            i, part = finished.get(timeout=timeout) if timeout else finished.get_nowait()
        except queue.Empty:
            return
        timeout = 0.0
        if i < 0:
            raise RuntimeError(f"a decoding worker process failed: {part}")
        results.setdefault(i, part)


def _size_error(probes: list, good: list[int], describe: Callable[[int], str]) -> DataError:
    sizes = Counter((probes[i][1], probes[i][2]) for i in good)
    example = {}
    for i in good:
        example.setdefault((probes[i][1], probes[i][2]), i)
    common = ", ".join(f"{w}×{h} ({n} file{'s' if n > 1 else ''}, e.g. {describe(example[(w, h)])})"
                       for (w, h), n in sizes.most_common(3))
    more = f" and {len(sizes) - 3} more" if len(sizes) > 3 else ""
    return DataError(f"the images have {len(sizes)} different sizes: {common}{more}. "
                     f"Set the size the model sees, e.g. `--set image_size=224` (each image is resized on "
                     f"decoding; `resize` says how: center-crop, pad or stretch); your files stay as they are")


def _build(base: Path, files: Sequence[str], describe: Callable[[int], str], size: int, resize: str,
           workers: int) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(base)
    probe_workers = workers if len(files) >= PARALLEL_PROBE_FILES else 1
    probes = list(_run(probe_files, _chunks(files, probe_workers), probe_workers, len(files),
                       "read image headers"))
    bad = {i: p for i, p in enumerate(probes) if isinstance(p, str)}
    good = [i for i in range(len(files)) if i not in bad]
    gray = all(probes[i][0] in GRAY_MODES for i in good)
    if size:
        height = width = size
    else:
        sizes = {(probes[i][1], probes[i][2]) for i in good}
        if len(sizes) > 1:
            raise _size_error(probes, good, describe)
        width, height = next(iter(sizes)) if sizes else (1, 1)
    shape = (len(good), 1 if gray else 3, height, width)
    source_pixels = sum(probes[i][1] * probes[i][2] for i in good)
    decode_workers = workers if source_pixels >= PARALLEL_DECODE_PIXELS else 1
    pixels = base.with_name(f"{base.name}.u8.{os.getpid()}.tmp")
    try:
        with open(pixels, "wb") as fh:
            fh.truncate(math.prod(shape))  # sparse until written: no time spent zeroing
        tasks = [(str(pixels), shape, gray, size, resize, rows)
                 for rows in _chunks([(row, str(files[i])) for row, i in enumerate(good)], decode_workers)]
        failed = {good[row]: reason for row, reason in
                  enumerate(_run(_decode_chunk, tasks, decode_workers, len(good), "decode images")) if reason}
        if failed:
            shape = _compact(pixels, shape, [row for row, i in enumerate(good) if i not in failed])
            bad.update(failed)
        with open(pixels, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(pixels, base.with_suffix(".u8"))
    finally:
        pixels.unlink(missing_ok=True)
    listed = sorted(bad.items())
    write_csv(base.with_suffix(".bad.csv"), ["file", "reason"],
              [{"file": describe(i), "reason": reason} for i, reason in listed])
    meta = {"format": CACHE_FORMAT, "shape": list(shape), "files": len(files), "image_size": size,
            "resize": resize, "bad": [[i, reason] for i, reason in listed]}
    atomic_write_text(base.with_suffix(".json"), json.dumps(meta))


def _compact(pixels: Path, shape: tuple[int, ...], keep: list[int]) -> tuple[int, ...]:
    """Move the kept rows up over the failed ones, in order, and cut the file to them."""
    mapped = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=shape)
    for new, old in enumerate(keep):
        if new != old:
            mapped[new] = mapped[old]
    mapped.flush()
    del mapped
    new_shape = (len(keep), *shape[1:])
    os.truncate(pixels, math.prod(new_shape))
    return new_shape


def _remove_stale_temporaries(base: Path) -> None:
    """Temporary files of builds whose process is gone (killed mid-build): they are never read,
    only in the way of disk space."""
    for tmp in base.parent.glob(f"{base.name}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def bad_images_error(pool: DecodedPool, n_files: int, describe: Callable[[int], str]) -> DataError:
    """The one error for every file that cannot be decoded (bad_images: refuse)."""
    shown = "; ".join(f"{describe(i)}: {reason}" for i, reason in pool.bad[:5])
    more = f"; and {len(pool.bad) - 5} more" if len(pool.bad) > 5 else ""
    return DataError(f"{len(pool.bad)} of {n_files} image files cannot be used: {shown}{more}. All of them are "
                     f"listed in {pool.bad_list}. Replace or remove them, or set `--set bad_images=skip` to "
                     f"leave them out of the pool (the experiment records which)")
