"""The files of an image folder, listed compactly: a million files are not a million strings.

Every step of a cycle (training, evaluation, scoring, each Dask worker and DDP rank) lists the
image folder again, to check it and to name the files. Held as Python lists, each file costs a
path string, an id string, a stat entry and a label (about 600 bytes, 0.6 GB a process at a
million files, plus what the interpreter keeps of it after it is freed). A `FolderListing`
holds the file names of every (split, class) folder packed into one UTF-8 blob with their end
offsets (about 15 bytes a file), and the ids and absolute paths are made when asked for
(`ListedNames`); an id is found by binary search in its folder's sorted names, never through a
dict of every id.
"""
from __future__ import annotations

import bisect
import hashlib
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np


@dataclass
class FolderListing:
    """The image files under root/<split>/<class>/, in order: splits as listed, classes in their
    order, names sorted within a folder. Folder f holds rows starts[f] .. starts[f+1]-1."""

    root: str
    folders: list[tuple[str, str]]      # (split, class name) of each folder, in row order
    labels: list[int]                   # the class number of each folder
    starts: np.ndarray                  # first row of each folder, and the row count last
    names: bytes | bytearray            # every file name, UTF-8, concatenated in row order
    ends: np.ndarray                    # end offset of each name in `names` (int32 when it fits)
    digest: str                         # sha256 of every [relpath, size, mtime_ns], in order
    _folder_of: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._folder_of = {folder: f for f, folder in enumerate(self.folders)}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def name(self, row: int) -> str:
        start = int(self.ends[row - 1]) if row else 0
        return self.names[start:int(self.ends[row])].decode("utf-8", "surrogateescape")

    def folder(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right")) - 1

    def relpath(self, row: int) -> str:
        split, cls = self.folders[self.folder(row)]
        return f"{split}/{cls}/{self.name(row)}"

    def row_labels(self, rows: np.ndarray | range) -> np.ndarray:
        """The class number (int64) of each of `rows`."""
        rows = np.arange(rows.start, rows.stop) if isinstance(rows, range) else rows
        folders = np.searchsorted(self.starts, rows, side="right") - 1
        return np.asarray(self.labels, dtype=np.int64)[folders]

    def find(self, relstem: str) -> int | None:
        """The row of `split/class/stem` (a relative path without its extension, the stem itself
        maybe in subfolders of the class folder), or None."""
        parts = relstem.split("/")
        if len(parts) < 3 or not all(parts[2:]):
            return None
        f = self._folder_of.get((parts[0], parts[1]))
        if f is None:
            return None
        lo, hi, stem = int(self.starts[f]), int(self.starts[f + 1]), "/".join(parts[2:])
        # Names are sorted, so every name that starts with `stem.` sits in one run from here.
        row = bisect.bisect_left(_Names(self), stem + ".", lo, hi)
        while row < hi and self.name(row).startswith(stem + "."):
            if os.path.splitext(self.name(row))[0] == stem:
                return row
            row += 1
        return None


class _Names(Sequence[str]):
    """A listing's file names as a sequence, for bisect."""

    def __init__(self, listing: FolderListing) -> None:
        self.listing = listing

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, row):  # type: ignore[override]
        return self.listing.name(row)


def list_folders(root: str, folders: list[tuple[str, str]], labels: list[int],
                 suffixes: tuple[str, ...]) -> FolderListing:
    """List the visible files with one of `suffixes` of each root/<split>/<class> folder (a missing
    folder holds none), names sorted, their [relpath, size, mtime_ns] hashed as they are read."""
    digest = hashlib.sha256()
    # array("q") and a bytearray grow in place; both are handed to the listing without a copy.
    packed, ends, starts = bytearray(), array("q"), [0]
    for split, cls in folders:
        folder = os.path.join(root, split, cls)
        names = sorted(_image_names(folder, suffixes))
        for name in names:
            st = os.stat(os.path.join(folder, name))
            relpath = f"{split}/{cls}/{name}"
            digest.update(f"{len(relpath)}:{relpath}:{st.st_size}:{st.st_mtime_ns};".encode("utf-8", "surrogateescape"))
            packed += name.encode("utf-8", "surrogateescape")
            ends.append(len(packed))
        starts.append(len(ends))
    offsets = np.frombuffer(ends, dtype=np.int64)
    if len(packed) < 2**31:  # half the memory for the offsets of any folder of names under 2 GB
        offsets = offsets.astype(np.int32)
    return FolderListing(root, folders, labels, np.asarray(starts, dtype=np.int64), packed, offsets,
                         digest.hexdigest())


def _image_names(folder: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Visible files with an image suffix below `folder`, as paths relative to it (`a.jpg`,
    `2019 trip/b.jpg`): photos sorted into subfolders of a class folder are of that class, as in
    torchvision's ImageFolder. Hidden files and folders (a leading ".") are left out; a linked
    folder is followed, but never into a folder already listed (a link back up would loop).
    os.scandir: no stat to tell files from folders."""
    if not os.path.isdir(folder):
        return
    pending, listed = [""], set()
    while pending:
        sub = pending.pop()
        here = os.path.join(folder, sub)
        real = os.path.realpath(here)
        if real in listed:
            continue
        listed.add(real)
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = sub + entry.name
                if entry.is_dir():
                    pending.append(name + "/")
                elif os.path.splitext(entry.name)[1].lower() in suffixes and entry.is_file():
                    yield name


def duplicate_stem(listing: FolderListing) -> str | None:
    """The id (split/class/stem) two files of one folder share (same name, other extension), if any.

    Hashes, not a set of every stem: a set of a folder's names would be held at its largest."""
    for f, (split, cls) in enumerate(listing.folders):
        rows = range(int(listing.starts[f]), int(listing.starts[f + 1]))
        hashes = np.fromiter((hash(os.path.splitext(listing.name(r))[0]) for r in rows), np.int64, len(rows))
        order = np.argsort(hashes, kind="stable")
        for i in np.flatnonzero(np.diff(hashes[order]) == 0):
            a, b = (os.path.splitext(listing.name(rows[int(order[j])]))[0] for j in (i, i + 1))
            if a == b:
                return f"{split}/{cls}/{a}"
    return None


class MadeNames(Sequence[str]):
    """Strings made when asked for, never held: a pool's ids or file paths. A subclass says how
    many there are (`__len__`), how the i-th is made (`_name`) and where an id is (`position`)."""

    def _name(self, i: int) -> str:
        raise NotImplementedError

    def position(self, sid: str) -> int | None:
        """Where the id `sid` is, or None when it is not one of these."""
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        n = len(self)
        if isinstance(index, slice):
            return [self._name(i) for i in range(*index.indices(n))]
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"position {i} is outside the {n} names")
        return self._name(i % n)

    def __iter__(self) -> Iterator[str]:
        return (self._name(i) for i in range(len(self)))

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, str) and self.position(sid) is not None


class ListedNames(MadeNames):
    """The ids (`kind="id"`: split/class/stem) or absolute paths (`kind="file"`) of some rows of a
    FolderListing; `position` finds an id by binary search.

    `rows`: ascending row numbers, or a `range` (no array at all when no file was left out)."""

    def __init__(self, listing: FolderListing, rows: np.ndarray | range, kind: str) -> None:
        if kind not in ("id", "file"):
            raise ValueError(f"kind must be 'id' or 'file', not {kind!r}")
        if isinstance(rows, range) and rows.step != 1:
            rows = np.asarray(rows, dtype=np.int64)
        self.rows = rows if isinstance(rows, range) else np.asarray(rows, dtype=np.int64)
        self.listing, self.kind = listing, kind

    def __len__(self) -> int:
        return len(self.rows)

    def _name(self, i: int) -> str:
        relpath = self.listing.relpath(int(self.rows[i]))
        return os.path.splitext(relpath)[0] if self.kind == "id" else f"{self.listing.root}/{relpath}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ListedNames) and other.listing is self.listing and other.kind == self.kind:
            return len(self.rows) == len(other.rows) and bool(np.array_equal(np.asarray(self.rows), np.asarray(other.rows)))
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence, like a list

    def take(self, positions: np.ndarray | Sequence[int]) -> "ListedNames":
        """These names at `positions`, still made when asked for."""
        positions = np.asarray(positions, dtype=np.int64)
        if isinstance(self.rows, range):
            return ListedNames(self.listing, positions + self.rows.start, self.kind)
        return ListedNames(self.listing, self.rows[positions], self.kind)

    def position(self, sid: str) -> int | None:
        row = self.listing.find(sid) if self.kind == "id" else None
        if row is None:
            return None
        if isinstance(self.rows, range):
            return row - self.rows.start if row in self.rows else None
        # rows ascend (a listing's rows, some left out, some taken in order), so search them;
        # otherwise look for the row itself.
        at = int(np.searchsorted(self.rows, row))
        if at < len(self.rows) and self.rows[at] == row:
            return at
        hits = np.flatnonzero(self.rows == row)
        return int(hits[0]) if len(hits) else None
