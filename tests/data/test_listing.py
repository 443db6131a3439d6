"""An image folder's listing: the same ids, paths and order as a plain walk, found by binary
search, and no string per file held by the loaded data set."""
from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tidal.data import DataError, load_dataset
from tidal.data.cache import IMAGE_SUFFIXES
from tidal.data.dataset import hold_out_validation, imbalanced
from tidal.data.image_sources import ImageOptions
from tidal.data.listing import ListedNames, list_folders

# Names whose sort order and stems trip a naive lookup: "-" and "_" sort around ".", a stem that
# is another's prefix, a dotted stem, a non-ASCII name, upper-case suffixes.
TRICKY = ["x.jpg", "x-1.png", "x.tar.jpg", "x_2.JPG", "xa.png", "é.png", "10.png", "9.png", "a b.jpeg"]


def _tiny(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").save(path)


def _tricky_folder(root: Path) -> Path:
    seed = 0
    for split in ("train", "test"):
        for cls in ("a-b", "a", "b"):  # "a-b" sorts before "a/" in a path, after "a" as a name
            for name in TRICKY:
                seed += 1
                _tiny(root / split / cls / name, seed)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"")
    return root


def _plain_walk(root: Path) -> tuple[list[str], list[str]]:
    """What a user would write: ids = relative path without extension, classes and names sorted;
    the files' absolute paths."""
    ids, files = [], []
    for cls in sorted(os.listdir(root / "train")):
        for name in sorted(os.listdir(root / "train" / cls)):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                ids.append(f"train/{cls}/{os.path.splitext(name)[0]}")
                files.append(str(root / "train" / cls / name))
    return ids, files


def test_ids_paths_and_order_match_a_plain_walk(tmp_path):
    root = _tricky_folder(tmp_path / "photos")
    data = load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")
    expected, files = _plain_walk(root)
    assert isinstance(data.pool_ids, ListedNames)
    assert list(data.pool_ids) == data.pool_ids[:] == expected
    assert data.pool_ids == expected and data.pool_ids != expected[::-1]
    assert list(data.pool_files) == files and len(files) == 3 * len(TRICKY)
    assert data.classes == ["a", "a-b", "b"]
    assert data.pool_labels.tolist() == [0] * 9 + [1] * 9 + [2] * 9


def test_every_id_is_found_where_it_is_and_nothing_else_is(tmp_path):
    data = load_dataset(_tricky_folder(tmp_path / "photos"), "imagefolder", cache_dir=tmp_path / "cache")
    ids = list(data.pool_ids)
    assert data.index_of(ids[::-1]).tolist() == list(range(len(ids)))[::-1]
    for missing in ("train/a/x.jpg", "train/a/x-", "train/a/x.tar.jpg", "train/a", "train/a/", "test/a/x",
                    "train/c/x", "train/a/y", "train/a/x/extra", "train/a/notes", "train/a/.hidden"):
        assert missing not in data.pool_ids, missing
    with pytest.raises(DataError, match="not in the imagefolder pool"):
        data.index_of([ids[0], "train/a/y"])


def test_held_out_and_imbalanced_pools_stay_listings_with_the_right_ids(tmp_path):
    data = load_dataset(_tricky_folder(tmp_path / "photos"), "imagefolder", cache_dir=tmp_path / "cache")
    ids = list(data.pool_ids)
    held = hold_out_validation(data, 5, seed=3)
    assert isinstance(held.pool_ids, ListedNames) and isinstance(held.pool_files, ListedNames)
    kept = [i for i in ids if i in set(held.pool_ids)]
    assert list(held.pool_ids) == kept and len(kept) == len(ids) - 5
    assert held.index_of(kept).tolist() == list(range(len(kept)))
    assert [os.path.splitext(f)[0].endswith(i) for i, f in zip(held.pool_ids, held.pool_files)] == [True] * len(kept)
    skewed = imbalanced(data, 4.0, seed=0)
    assert isinstance(skewed.pool_ids, ListedNames)
    assert skewed.index_of(list(skewed.pool_ids)).tolist() == list(range(len(skewed.pool_ids)))
    assert all(ids.index(i) == int(data.index_of([i])) for i in skewed.pool_ids)


def test_two_files_with_one_stem_in_a_folder_are_refused(tmp_path):
    root = _tricky_folder(tmp_path / "photos")
    _tiny(root / "train" / "b" / "x.png", 99)  # beside x.jpg: both would be train/b/x
    with pytest.raises(DataError, match="share the id 'train/b/x'"):
        load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")


def test_the_listing_key_follows_a_touched_file(tmp_path):
    root = _tricky_folder(tmp_path / "photos")
    folders = [("train", "a"), ("train", "b")]
    before = list_folders(str(root), folders, [0, 1], IMAGE_SUFFIXES).digest
    assert list_folders(str(root), folders, [0, 1], IMAGE_SUFFIXES).digest == before
    os.utime(root / "train" / "b" / "9.png", ns=(1, 1))
    assert list_folders(str(root), folders, [0, 1], IMAGE_SUFFIXES).digest != before


def test_a_loaded_pool_holds_no_python_string_per_file(tmp_path):
    """The data set of 3,000 files keeps under 60 bytes of Python/numpy memory per file (the
    packed names, their offsets, the kept rows); the lists of ids and paths it held before kept 180."""
    root = tmp_path / "many"
    for split, n in (("train", 1500), ("test", 20)):
        for cls in ("cat", "dog"):
            for i in range(n):
                _tiny(root / split / cls / f"photo_{i:06d}.png", i)
    options = ImageOptions(cache_dir=tmp_path / "cache")
    load_dataset(root, "imagefolder", images=options)  # builds the decoded cache first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = load_dataset(root, "imagefolder", images=options)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(data.pool_ids) == 3000 and data.pool_ids[0] == "train/cat/photo_000000"
    assert held / 3040 < 60, f"{held / 3040:.0f} bytes held per file"


def test_photos_in_subfolders_of_a_class_folder_are_of_that_class(tmp_path):
    """train/<class>/2019 trip/x.jpg is a photo of <class> (as torchvision's ImageFolder reads it),
    even in a class folder that holds only subfolders; hidden folders are left out, and a linked
    folder that leads back up is not listed twice."""
    root = tmp_path / "photos"
    _tiny(root / "train" / "cats" / "a.jpg", 1)
    _tiny(root / "train" / "cats" / "2019 trip" / "b.jpg", 2)
    _tiny(root / "train" / "cats" / "2019 trip" / "day 2" / "c.png", 3)
    _tiny(root / "train" / "dogs" / "indoor" / "d.jpg", 4)  # only in a subfolder
    _tiny(root / "train" / "dogs" / ".thumbnails" / "d.jpg", 5)  # hidden: not a photo of the set
    _tiny(root / "test" / "cats" / "sub" / "e.jpg", 6)
    _tiny(root / "test" / "dogs" / "f.jpg", 7)
    (root / "train" / "cats" / "2019 trip" / "back up").symlink_to(root / "train" / "cats")
    data = load_dataset(root, "imagefolder", images=ImageOptions(size=4))
    assert list(data.pool_ids) == ["train/cats/2019 trip/b", "train/cats/2019 trip/day 2/c", "train/cats/a",
                                   "train/dogs/indoor/d"]
    assert data.pool_labels.tolist() == [0, 0, 0, 1] and data.test_labels.tolist() == [0, 1]
    assert data.pool_files[1] == str(root / "train" / "cats" / "2019 trip" / "day 2" / "c.png")
    assert data.index_of(["train/dogs/indoor/d", "train/cats/2019 trip/day 2/c"]).tolist() == [3, 1]
    with pytest.raises(DataError):
        data.index_of(["train/cats/b"])  # the stem alone is not its id
    expected = np.asarray(Image.open(root / "train" / "cats" / "2019 trip" / "day 2" / "c.png").convert("RGB"))
    assert np.array_equal(data.pool_images[1].permute(1, 2, 0).numpy(), expected)
