"""Folders as users have them: many sizes and modes, bad files, odd entries in the data root."""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tidal.data.cache as cache_mod
from tidal.data import DataError, load_dataset
from tidal.data.decode import decode, probe
from tidal.data.image_sources import ImageOptions
from tidal.data.version import verify_data_version


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _folder(root: Path, sizes: dict[str, list[tuple[int, int]]], test_per_class: int = 1,
            test_size: tuple[int, int] = (37, 23)) -> Path:
    """root/{train,test}/<class>/<i>.jpg with the given train sizes per class."""
    seed = 0
    for cls, class_sizes in sizes.items():
        for i, (w, h) in enumerate(class_sizes):
            seed += 1
            _save(root / "train" / cls / f"{i:03d}.jpg", _rgb(w, h, seed), quality=90)
        for i in range(test_per_class):
            seed += 1
            _save(root / "test" / cls / f"{i:03d}.jpg", _rgb(*test_size, seed), quality=90)
    return root


# --- decoding one file ---------------------------------------------------------------------------

def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(values))
    assert probe(str(path))[0].startswith("I")
    out = decode(str(path), gray=True)
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    assert out[0].tolist() == np.round(values / 257.0).astype(np.uint8).tolist() == [[0, 1, 128], [255, 4, 233]]
    # in an RGB pool the same values are repeated on the three channels
    assert (decode(str(path), gray=False) == out).all()


def test_32_bit_and_float_grayscale_are_brought_to_8_bits(tmp_path):
    ints = np.array([[0, 65535]], dtype=np.int32)
    assert decode(str(_save(tmp_path / "i32.tif", Image.fromarray(ints))), gray=True)[0].tolist() == [[0, 255]]
    floats = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    assert decode(str(_save(tmp_path / "f.tif", Image.fromarray(floats))), gray=True)[0].tolist() == [[0, 128, 255, 255]]


def test_cmyk_palette_and_transparency_convert_as_a_viewer_shows_them(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no black, full magenta and yellow: red
    out = decode(str(_save(tmp_path / "cmyk.jpg", cmyk, quality=100)), gray=False)
    assert out.shape == (3, 4, 4) and abs(int(out[0, 0, 0]) - 255) <= 2 and out[1:, 0, 0].max() <= 2
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4)
    assert decode(str(_save(tmp_path / "p.png", palette)), gray=False)[:, 0, 0].tolist() == [10, 200, 30]
    # fully transparent pixels are white (what a viewer shows), not the colour stored under them
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    out = decode(str(_save(tmp_path / "rgba.png", rgba)), gray=False)
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 1, 1].tolist() == [255, 0, 0]
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode(str(_save(tmp_path / "la.png", la)), gray=True)[0].tolist() == [[255, 255], [255, 255]]


def test_exif_orientation_is_applied(tmp_path):
    # A 40×20 landscape image, left half black, right half white, stored with orientation 6
    # ("rotate 90° clockwise to view"): it stands as 20×40 with the white half at the bottom.
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rot.jpg", Image.fromarray(pixels, "L"), exif=exif, quality=100)
    assert probe(str(path))[1:] == (20, 40)
    out = decode(str(path), gray=True)[0]
    assert out.shape == (40, 20)
    assert out[:15].mean() < 10 and out[25:].mean() > 245


def test_resize_policies(tmp_path):
    # 40×20: a black left quarter, then grey, then a white right quarter
    pixels = np.full((20, 40), 128, dtype=np.uint8)
    pixels[:, :10], pixels[:, 30:] = 0, 255
    path = str(_save(tmp_path / "wide.png", Image.fromarray(pixels, "L")))
    crop = decode(path, gray=True, size=10, resize="center-crop")[0]
    assert crop.shape == (10, 10) and abs(int(crop.mean()) - 128) <= 1  # the centre: grey only
    pad = decode(path, gray=True, size=10, resize="pad")[0]
    assert pad[0].max() == 0 and pad[-1].max() == 0 and pad[5, -1] > 240  # black bars, the whole photo
    stretch = decode(path, gray=True, size=10, resize="stretch")[0]
    assert stretch[:, 0].max() < 10 and stretch[:, -1].min() > 245 and stretch.shape == (10, 10)


def test_jpeg_draft_decoding_keeps_the_picture(tmp_path):
    """A phone-size JPEG decoded at a reduced scale (Image.draft) gives nearly the full decode's pixels."""
    yy, xx = np.mgrid[0:1500, 0:2000]
    smooth = np.stack([xx * 255 // 2000, yy * 255 // 1500, (xx + yy) * 255 // 3500], axis=-1).astype(np.uint8)
    path = str(_save(tmp_path / "phone.jpg", Image.fromarray(smooth), quality=95))
    fast = decode(path, gray=False, size=64).astype(int)
    with Image.open(path) as im:
        from PIL import ImageOps

        full = np.asarray(ImageOps.fit(im.convert("RGB"), (64, 64), method=Image.Resampling.BILINEAR))
    assert np.abs(fast - full.transpose(2, 0, 1).astype(int)).max() <= 6


# --- a folder of photos ----------------------------------------------------------------------------

def test_a_panorama_over_pillows_header_limit_decodes_and_the_limit_is_on_decoded_pixels(tmp_path, monkeypatch):
    """Pillow refuses a 16000×12000 file from its header (over 179 M pixels); brought to 224 px
    it is decoded at 1/8 of its size (2000×1500), so it is a photo like any other. The limit is
    on the pixels decoded: at its own size it is refused, and so is any image that is decoded
    whole above the limit. Pillow's header check still refuses what even a 1/8 decode could not
    bring under the limit."""
    from PIL import Image

    from tidal.data import decode as decode_mod

    pano = _save(tmp_path / "pano.jpg", Image.new("L", (16000, 12000), 77), quality=80)
    assert probe(str(pano)) == ("L", 16000, 12000)
    array = decode(str(pano), gray=True, size=224)
    assert array.shape == (1, 224, 224) and abs(int(array.mean()) - 77) <= 1
    with pytest.raises(decode_mod.BadImage, match="too large to decode: 16000×12000 pixels.*set image_size"):
        decode(str(pano), gray=True, size=0)
    small = _save(tmp_path / "small.png", _rgb(40, 30, 1))
    monkeypatch.setattr(decode_mod, "DECODED_PIXEL_LIMIT", 40 * 30 - 1)
    with pytest.raises(decode_mod.BadImage, match="too large to decode: 40×30 pixels"):
        decode(str(small), gray=False, size=16)  # a PNG has no smaller decode
    monkeypatch.setattr(decode_mod, "PILLOW_MAX_IMAGE_PIXELS", 16000 * 12000 // 2 - 1)
    with pytest.raises(decode_mod.BadImage, match="decompression bomb"):
        probe(str(pano))


def test_every_suffix_a_camera_or_browser_saves_is_read(tmp_path):
    """JPEG as .jpe/.jfif (what browsers save), AVIF and WebP, in any case of the suffix."""
    names = {"a": ["0.jpe", "1.JFIF", "2.avif"], "b": ["3.webp", "4.Jpeg", "5.tif"]}
    for cls, files in names.items():
        for i, name in enumerate(files):
            fmt = {".jpe": "JPEG", ".jfif": "JPEG", ".jpeg": "JPEG"}.get(Path(name).suffix.lower())
            _save(tmp_path / "train" / cls / name, _rgb(20 + i, 12, i), **({"format": fmt} if fmt else {}))
        _save(tmp_path / "test" / cls / "t.png", _rgb(9, 9, 9))
    data = load_dataset(tmp_path, "imagefolder", images=ImageOptions(size=8))
    assert sorted(data.pool_ids) == sorted(f"train/{c}/{Path(n).stem}" for c, files in names.items() for n in files)


def test_mixed_sizes_need_image_size_then_decode_to_it(tmp_path):
    root = _folder(tmp_path / "photos", {"ants": [(50, 30), (30, 50), (64, 48)], "bees": [(40, 40), (80, 20)]})
    with pytest.raises(DataError, match=r"different sizes.*image_size=224"):
        load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.u8"))  # nothing half-built is left
    data = load_dataset(root, "imagefolder", images=ImageOptions(size=16), cache_dir=tmp_path / "cache")
    assert data.pool_images.shape == (5, 3, 16, 16) and data.test_images.shape == (2, 3, 16, 16)
    assert data.pool_ids == ["train/ants/000", "train/ants/001", "train/ants/002", "train/bees/000", "train/bees/001"]
    expected = decode(str(root / "train/bees/001.jpg"), gray=False, size=16)
    assert torch.equal(data.pool_images[4], torch.from_numpy(expected))
    # the queries name the user's original files, not a resized copy
    assert data.pool_files[4] == str((root / "train/bees/001.jpg").absolute())
    # another size or policy is another cache entry; the first is kept
    other = load_dataset(root, "imagefolder", images=ImageOptions(size=8, resize="pad"), cache_dir=tmp_path / "cache")
    assert other.pool_images.shape == (5, 3, 8, 8) and len(list((tmp_path / "cache").glob("*.u8"))) == 2


def test_pool_is_grayscale_only_when_every_file_is(tmp_path):
    root = tmp_path / "gray"
    for split in ("train", "test"):
        _save(root / split / "a" / "0.png", Image.fromarray(np.full((6, 6), 7, dtype=np.uint8), "L"))
        _save(root / split / "b" / "0.png", Image.fromarray(np.full((6, 6), 60000, dtype=np.uint16)))
    data = load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")
    assert data.in_channels == 1 and data.pool_images[1].unique().tolist() == [233]
    _save(root / "train" / "b" / "1.png", _rgb(6, 6, 3))
    data = load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")
    assert data.in_channels == 3 and data.pool_images[0].unique().tolist() == [7]


def _break(root: Path) -> list[Path]:
    """A truncated JPEG, an empty file and a text file named .jpg among good photos."""
    truncated = root / "train" / "ants" / "001.jpg"
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 3])
    empty = root / "train" / "bees" / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "test" / "ants" / "notes.jpg"
    text.write_text("not a photo\n")
    return [truncated, empty, text]


def test_bad_files_are_refused_all_at_once_and_listed(tmp_path):
    root = _folder(tmp_path / "photos", {"ants": [(20, 20)] * 4, "bees": [(20, 20)] * 4}, test_size=(20, 20))
    bad = _break(root)
    with pytest.raises(DataError) as caught:
        load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("3 of 12 image files cannot be used")
    for path in bad:
        assert str(path) in message
    assert "bad_images=skip" in message
    listing = Path(message.split("listed in ")[1].split(". ")[0])
    lines = listing.read_text().splitlines()
    assert lines[0] == "file,reason" and len(lines) == 4
    assert any("empty file" in line for line in lines) and any("not an image" in line for line in lines)


def test_bad_files_skipped_are_left_out_and_recorded(tmp_path):
    root = _folder(tmp_path / "photos", {"ants": [(20, 20)] * 4, "bees": [(20, 20)] * 4}, test_size=(20, 20))
    bad = _break(root)
    data = load_dataset(root, "imagefolder", images=ImageOptions(bad_images="skip"), cache_dir=tmp_path / "cache")
    assert len(data.pool_ids) == 7 and "train/ants/001" not in data.pool_ids and "train/bees/empty" not in data.pool_ids
    assert data.pool_images.shape[0] == 7 and len(data.test_labels) == 2
    assert sorted(f for f, _ in data.skipped) == sorted(str(p) for p in bad)
    # the rows kept are the good files' own pixels, in order
    assert torch.equal(data.pool_images[1], torch.from_numpy(decode(str(root / "train/ants/002.jpg"), gray=False)))
    assert data.pool_labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_a_parallel_build_equals_one_process(tmp_path, monkeypatch):
    """Worker processes write the same bytes, in the same rows, as one process does."""
    # small files: lower the thresholds, so both passes really go to worker processes
    monkeypatch.setattr(cache_mod, "PARALLEL_PROBE_FILES", 0)
    monkeypatch.setattr(cache_mod, "PARALLEL_DECODE_PIXELS", 0)
    pools = []
    real_context = cache_mod.multiprocessing.get_context
    monkeypatch.setattr(cache_mod.multiprocessing, "get_context", lambda m: pools.append(m) or real_context(m))
    sizes = [(20 + i % 7, 18 + i % 5) for i in range(150)]
    root = _folder(tmp_path / "photos", {"a": sizes, "b": sizes})
    (root / "train" / "b" / "077.jpg").write_bytes(b"\xff\xd8 broken")
    options = ImageOptions(size=12, bad_images="skip")
    serial = cache_mod.decoded_pool("imagefolder", sorted(str(p) for p in root.rglob("*.jpg")), ["serial"],
                                    str, 12, "center-crop", tmp_path / "serial", workers=1)
    parallel = cache_mod.decoded_pool("imagefolder", sorted(str(p) for p in root.rglob("*.jpg")), ["parallel"],
                                      str, 12, "center-crop", tmp_path / "parallel", workers=2)
    assert len(serial.bad) == len(parallel.bad) == 1 and serial.bad[0][0] == parallel.bad[0][0]
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))
    assert parallel.images.shape == (301, 3, 12, 12)
    assert pools == ["fork", "fork"]  # the parallel build's two passes, none for workers=1
    data = load_dataset(root, "imagefolder", images=options, cache_dir=tmp_path / "cache")
    assert data.pool_images.shape[0] == 299


def _chunk_pids(chunk: list[int]) -> list[tuple[int, int]]:
    time.sleep(0.02)  # long enough that the forked helper starts before this process has taken every chunk
    return [(i, os.getpid()) for i in chunk]


def test_the_build_shares_chunks_between_this_process_and_its_helpers():
    """Every chunk is done once, results come back in file order, and both processes work."""
    chunks = cache_mod._chunks(list(range(320)), 2)
    assert len(chunks) == 32  # CHUNKS_PER_WORKER a worker, so the last chunk is a small part of the work
    out = list(cache_mod._run(_chunk_pids, chunks, 2, 320, "test"))
    assert [i for i, _ in out] == list(range(320))
    assert os.getpid() in {pid for _, pid in out} and len({pid for _, pid in out}) == 2


def test_a_helper_that_fails_is_an_error_and_one_that_dies_or_hangs_is_done_without(monkeypatch):
    """A helper's exception reaches the caller; a helper that dies (killed for memory) or hangs (a
    fork can inherit a lock another thread held) costs time, never the build: this process does
    the chunks it left, and ends it."""
    parent = os.getpid()

    def fails(chunk: list[int]) -> list[int]:
        if os.getpid() != parent:
            raise MemoryError("no room")
        time.sleep(0.05)
        return chunk

    def dies(chunk: list[int]) -> list[int]:
        if os.getpid() != parent:
            os._exit(3)
        time.sleep(0.01)
        return chunk

    def hangs(chunk: list[int]) -> list[int]:
        if os.getpid() != parent:
            threading.Event().wait()  # forever
        time.sleep(0.05)  # 2 s in all: the helpers have long started and each taken a chunk
        return chunk

    with pytest.raises(RuntimeError, match="MemoryError: no room"):
        list(cache_mod._run(fails, [[i] for i in range(40)], 2, 40, "test"))
    assert list(cache_mod._run(dies, [[i] for i in range(40)], 2, 40, "test")) == list(range(40))
    # Two stuck helpers, each holding the one chunk it took: one bounded wait for each such chunk.
    waits, collect = [], cache_mod._collect
    monkeypatch.setattr(cache_mod, "_collect",
                        lambda finished, results, timeout=0.0: (timeout and waits.append(timeout))
                        or collect(finished, results, timeout))
    assert list(cache_mod._run(hangs, [[i] for i in range(40)], 3, 40, "test")) == list(range(40))
    assert 1 <= len(waits) <= 2 and all(0 < t < math.inf for t in waits), waits


def test_a_torn_cache_is_never_read(tmp_path):
    root = _folder(tmp_path / "photos", {"a": [(10, 10)] * 2, "b": [(10, 10)] * 2}, test_size=(10, 10))
    cache = tmp_path / "cache"
    first = load_dataset(root, "imagefolder", cache_dir=cache)
    pixels = next(cache.glob("*.u8"))
    expected = first.pool_images.clone()
    del first
    with open(pixels, "r+b") as fh:  # a file cut short (a crash while copying the cache, a full disk)
        fh.truncate(pixels.stat().st_size - 1)
    assert torch.equal(load_dataset(root, "imagefolder", cache_dir=cache).pool_images, expected)
    next(cache.glob("*.json")).unlink()  # the pixels without their description: rebuilt too
    (cache / f"{pixels.name}.999999999.tmp").write_bytes(b"left by a killed build")
    assert torch.equal(load_dataset(root, "imagefolder", cache_dir=cache).pool_images, expected)
    assert not list(cache.glob("*.tmp"))


def test_one_class_and_an_empty_class_folder_are_refused(tmp_path):
    one = _folder(tmp_path / "one", {"ants": [(8, 8)] * 3})
    with pytest.raises(DataError, match="one class folder.*at least two"):
        load_dataset(one, "imagefolder", cache_dir=tmp_path / "cache")
    root = _folder(tmp_path / "empty", {"ants": [(8, 8)] * 3, "bees": [(8, 8)] * 3})
    (root / "train" / "wasps").mkdir()
    with pytest.raises(DataError, match=r"wasps.*hold no images.*never be learned"):
        load_dataset(root, "imagefolder", cache_dir=tmp_path / "cache")


def _within(seconds: float, fn):
    """fn() in a thread; fail (instead of hanging the suite) when it takes longer."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_a_fifo_in_the_data_root_is_refused_not_waited_on(tmp_path):
    root = _folder(tmp_path / "photos", {"a": [(8, 8)], "b": [(8, 8)]})
    os.mkfifo(root / "train" / "a" / "pipe.jpg")
    with pytest.raises(DataError, match=r"pipe\.jpg is a FIFO.*Remove it"):
        _within(20, lambda: verify_data_version(root))


def test_a_symlink_loop_in_the_data_root_is_refused(tmp_path):
    root = _folder(tmp_path / "photos", {"a": [(8, 8)], "b": [(8, 8)]})
    (root / "train" / "a" / "again").symlink_to(root / "train")
    with pytest.raises(DataError, match=r"again is a symbolic link to .*train, a folder that holds it"):
        _within(20, lambda: verify_data_version(root))
    (root / "train" / "a" / "again").unlink()
    (root / "train" / "a" / "self.jpg").symlink_to(root / "train" / "a" / "self.jpg")
    with pytest.raises(DataError, match=r"self\.jpg cannot be read"):
        _within(20, lambda: verify_data_version(root))
    (root / "train" / "a" / "self.jpg").unlink()
    # a link to a folder elsewhere is data, as before
    elsewhere = _folder(tmp_path / "more", {"c": [(8, 8)]})
    (root / "train" / "a" / "more").symlink_to(elsewhere)
    assert verify_data_version(root)["data_version"]
