"""Data versions, computed exactly as DVC computes a directory's hash.

The version of the pool data directory `data_root` is the md5 DVC records for it in
`<data_root>.dvc` (e.g. `data.dvc`): md5 of the JSON list of {md5, relpath} of its files,
sorted by path. Computing it here needs neither DVC nor its cache, so a fresh clone can check
the materialized data against the committed pin before any `dvc` command has run.
"""
from __future__ import annotations

import hashlib
import json
from itertools import islice
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from tidal.data.errors import DataError
from tidal.progress import progress
from tidal.workspace import WorkspaceWriteError, atomic_write_bytes


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Human labels live in data_root/labels/ (pinned with the data, so every import is a new data
# version); the *pool* version leaves them out, so importing labels does not change the pool.
LABELS_DIR = "labels"


RACY_NS = 2_000_000_000


def _md5_memo_path(root: str) -> Path:
    from tidal.data.cache import cache_dir

    return cache_dir() / f"md5-{hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]}.json"


def _file_entries(directory: str | Path) -> list[tuple[str, str]]:
    """(relpath, md5) of every file below directory, sorted by relpath: what DVC hashes.

    A file whose size, mtime and inode are those of the last call keeps its md5 from then (a
    memo in the cache dir, outside the data, as DVC's own state db does): the check of a
    60,000-file folder every cycle then stats the files instead of reading them all: on
    CIFAR-10's JPEG folder 4.8 s for the first run, 1.3-1.6 s for the next ones, of
    `python -c "import time; from tidal.data.version import verify_data_version as v;
    t=time.perf_counter(); v('datasets/cifar10-jpg'); print(time.perf_counter()-t)"`.
    A file modified less than RACY_NS before the check is not memoized ("racy git"): a write
    within the same timestamp tick could otherwise go unseen.
    """
    root = str(directory)
    memo_path = _md5_memo_path(root)
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entries, fresh = [], {}
    now = time.time_ns()
    # A bar on a terminal: the first check of a big photo folder reads every byte of it.
    for full, relpath in progress(_files(root), desc=f"data version of {root}", unit="file"):
        st = _regular_file_stat(full)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = memo.get(relpath)
        if isinstance(known, list) and known[:3] == stamp:
            md5 = known[3]
        else:
            md5, known = _file_md5(Path(full)), None
        if now - st.st_mtime_ns > RACY_NS:
            # The memo's own entry when unchanged: a million files are not a million new lists.
            fresh[relpath] = known or [*stamp, md5]
        entries.append((relpath, md5))
    if fresh != memo:
        try:
            atomic_write_bytes(memo_path, _json_blocks(fresh.items(), lambda block: json.dumps(dict(block)), "{}"))
        except (WorkspaceWriteError, OSError):
            pass  # a read-only or full cache dir: the next call reads the files again
    entries.sort()
    return entries


def _json_blocks(items: Iterable, dumps: Callable[[list], str], brackets: str = "[]") -> Iterator[bytes]:
    """The bytes of one JSON list or object (`brackets`), a block of 10,000 items at a time:
    `dumps(block)` is the block as json.dumps writes that container, whose brackets are dropped.
    The same bytes as one json.dumps of everything, never held as one text (a million files)."""
    it = iter(items)
    yield brackets[0].encode()
    for i, block in enumerate(iter(lambda: list(islice(it, 10_000)), [])):
        yield ((", " if i else "") + dumps(block)[1:-1]).encode()
    yield brackets[1].encode()


def _files(root: str) -> Iterator[tuple[str, str]]:
    """(path, relpath with "/") of every file below root, in _walk's order."""
    for dirpath, _, filenames in _walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")  # once per folder, not per file
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in filenames:
            yield os.path.join(dirpath, name), prefix + name


def _walk(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk following linked folders (linked folders are data too), refusing a link that leads
    back to a folder above it: it would walk forever."""
    def refuse(err: OSError) -> None:
        raise DataError(f"cannot list {err.filename} in the data root ({err.strerror}); fix its permissions "
                        f"or remove it") from None

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=refuse):
        here = os.path.realpath(dirpath)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            target = os.path.realpath(full)
            if os.path.islink(full) and (here == target or here.startswith(target.rstrip(os.sep) + os.sep)):
                raise DataError(f"{full} is a symbolic link to {target}, a folder that holds it: a loop. "
                                f"Remove the link from the data root")
        yield dirpath, dirnames, filenames


def _regular_file_stat(path: str) -> os.stat_result:
    """The stat of a regular file; anything else in the data root is one clear DataError. A FIFO
    or device would block the read forever, a broken or looping link cannot be read at all."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path} is a symbolic link to a file that does not exist; remove it from the "
                        f"data root or restore its target") from None
    except OSError as err:  # ELOOP: a link to itself or a circle of links
        raise DataError(f"{path} cannot be read ({err.strerror}); remove it from the data root") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) \
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise DataError(f"{path} is {kind}, not a file: reading it could block forever. Remove it from the "
                        f"data root (keep only folders and files there)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path} is not readable (permission denied); fix its permissions or remove it")
    return st


def _tree_md5(entries: list[tuple[str, str]], exclude: tuple[str, ...] = ()) -> str:
    """md5 of DVC's listing, `json.dumps([{"md5": ..., "relpath": ...}, ...], sort_keys=True)`,
    fed to the hash a block of entries at a time."""
    digest = hashlib.md5()
    kept = (e for e in entries if e[0].split("/", 1)[0] not in exclude)
    for part in _json_blocks(kept, lambda block: json.dumps([{"md5": m, "relpath": r} for r, m in block],
                                                            sort_keys=True)):
        digest.update(part)
    return digest.hexdigest()


def dvc_dir_md5(directory: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """The md5 that `dvc add DIRECTORY` writes (without its `.dir` suffix).

    `exclude` names top-level entries to leave out (then it is no longer DVC's hash).
    """
    return _tree_md5(_file_entries(directory), exclude)


def pin_file(data_root: str | Path) -> Path:
    """Where DVC keeps the pin of data_root: `data` -> `data.dvc` beside it."""
    root = Path(data_root)
    return root.parent / f"{root.name}.dvc"


def pinned_md5(pin: str | Path) -> str:
    outs = yaml.safe_load(Path(pin).read_text())["outs"]
    return str(outs[0]["md5"]).removesuffix(".dir")


def pool_version(data_root: str | Path) -> str:
    """The version of the pool itself: data_root without the human labels folder."""
    return dvc_dir_md5(data_root, exclude=(LABELS_DIR,))


def experiment_data_version(data_root: str | Path, experiment: str, pool: str | None = None) -> str:
    """One experiment's data version: the pool and its own labels log, not other experiments'.

    md5 of "<pool version>:<md5 of labels/<experiment>.csv>"; without a labels log it is the pool
    version itself (which is DVC's md5 of a data_root that holds no labels). So an import into
    one experiment leaves every other experiment's version as it was.
    """
    pool = pool or pool_version(data_root)
    log = Path(data_root) / LABELS_DIR / f"{experiment}.csv"
    if not log.is_file():
        return pool
    return hashlib.md5(f"{pool}:{_file_md5(log)}".encode()).hexdigest()


@contextmanager
def pin_lock(data_root: str | Path) -> Iterator[None]:
    """Serialize re-pins of one DVC pin across processes (two imports at once, of any experiments):
    DVC itself refuses a second command while one holds its repository lock."""
    import fcntl

    pin = pin_file(data_root)
    lock_dir = pin.parent / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"tidal-pin-{pin.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def verify_data_version(data_root: str | Path) -> dict[str, str | bool]:
    """The data version of data_root, checked against its DVC pin when there is one.

    Returns {data_version, pool_version, pinned}; raises DataError if the directory differs
    from the pin.
    """
    entries = _file_entries(data_root)  # read every file once for both versions
    version, pool = _tree_md5(entries), _tree_md5(entries, exclude=(LABELS_DIR,))
    pin = pin_file(data_root)
    if not pin.is_file():
        return {"data_version": version, "pool_version": pool, "pinned": False}
    expected = pinned_md5(pin)
    if expected != version:
        name = Path(data_root).name
        changed = _changed_since_pin(pin, expected, entries)
        if changed is not None and changed and all(p.startswith(LABELS_DIR + "/") for p in changed):
            raise DataError(
                f"{data_root}/ differs from its pin {pin} only in imported labels ({', '.join(changed[:3])}"
                f"{', ...' if len(changed) > 3 else ''}): an import stopped before DVC pinned them. Pin them with "
                f"`{dvc_executable_or_name()} add {name}` (run where {pin.name} is) and commit {pin.name}; do not "
                f"`dvc checkout`, which would throw those labels away.")
        what = f" (changed: {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})" if changed else ""
        raise DataError(
            f"{data_root}/ does not match its pin {pin} (pinned {expected}, found {version}){what}. If you imported "
            f"labels or added data since, pin what is there now with `dvc add {name}` and commit {pin.name}; to "
            f"restore the pinned data instead, `dvc checkout {pin.name}` (it discards what the pin does not "
            f"hold, labels under {name}/{LABELS_DIR}/ included).")
    return {"data_version": version, "pool_version": pool, "pinned": True}


def _changed_since_pin(pin: Path, pinned: str, entries: list[tuple[str, str]]) -> list[str] | None:
    """The relpaths that differ from the pinned listing in the DVC cache; None without the cache."""
    for folder in (pin.parent, *pin.parent.parents):
        listing = folder / ".dvc" / "cache" / "files" / "md5" / pinned[:2] / f"{pinned[2:]}.dir"
        if listing.is_file():
            try:
                old = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
            except (OSError, ValueError, KeyError, TypeError):
                return None
            new = dict(entries)
            return sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
        if (folder / ".dvc").is_dir():
            return None
    return None


def dvc_executable_or_name() -> str:
    try:
        return dvc_executable()
    except DataError:
        return "dvc"


def dvc_executable() -> str:
    """The `dvc` installed with this package (beside the running Python), else the one on PATH.

    `.venv/bin/tidal` called without the venv active has no `dvc` on PATH, and another `dvc` on
    PATH may be another version: the one beside `sys.executable` is the project's pinned one.
    """
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise DataError(f"DVC is not installed beside {sys.executable} nor on PATH, so the labels could not "
                        f"be pinned; nothing was imported. Install the project (`make install`) and retry")
    return found


def dvc_add(data_root: str | Path) -> bool:
    """Re-pin data_root with `dvc add` when it is pinned (its .dvc file exists); return whether
    it did. Run from the DVC repository that holds the pin."""

    pin = pin_file(data_root)
    if not pin.is_file():
        return False
    result = subprocess.run([dvc_executable(), "add", "--quiet", Path(data_root).name], cwd=pin.parent,
                            capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        raise DataError(f"`dvc add {Path(data_root).name}` failed: {(result.stdout + result.stderr).strip()}")
    return True
