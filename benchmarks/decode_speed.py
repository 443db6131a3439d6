"""Decoding speed: photo folders to uint8 N×3×224×224, ours against the two things it replaces.

    .venv/bin/python benchmarks/decode_speed.py                    # ants-bees + 48 phone-size copies
    .venv/bin/python benchmarks/decode_speed.py --repeats 7 --phone 48,320

Sides, each producing every image of a set as 3×224×224 uint8 (shorter side to 224, centre
crop), alternated in one process (the order rotates every repeat) on the same files:

(a) ours: `tidal.data.cache.decoded_pool(..., size=224, resize="center-crop", workers=2)` into a
    fresh cache dir each repeat: the header probe pass, the decode pass (Pillow, JPEG `draft`) in
    forked worker processes writing into the memory-mapped file, its fsync and rename.
(b) today's one-process decode: the loop the commit before the photo-folder one (fde7141) had
    (`git show 202c0a2:tidal/data/cache.py`, `decode_images`: `Image.open`, `load`, `convert`,
    `np.asarray`, stacked into one N×C×H×W array), plus the same Pillow resize ours does
    (`ImageOps.fit`, bilinear, to 224×224) without `draft`, since it had no resize.
(c) what a user would write: torchvision `datasets.ImageFolder` with `Resize(224)`,
    `CenterCrop(224)`, `PILToTensor()` through `DataLoader(num_workers=2, batch_size=32)`,
    every batch kept and concatenated at the end.
Extra, for the profile (not targets): (d) ours without the cache: `tidal.data.decode.decode`
    (the same decode with `draft`) over the files in this one process; (e) the header probe pass
    alone (`tidal.data.decode.probe` over every file, a bad one's reason kept, as the cache's
    probe pass does) in this one process.

Files: ants-bees (../shared/data/ants-bees.tar.gz beside the checkout, 398 files: the 397 JPEGs are used, the
placeholder GIF left out because torchvision's ImageFolder does not read .gif), unpacked into
--work; and phone-size copies: the first N of those JPEGs (sorted by path), centre-cropped to
4:3 and upscaled with Pillow (bicubic) to 4000×3000, saved at JPEG quality 90. Upscaled photos
are smoother than a real camera's, so their entropy-coded data is smaller and Huffman decoding
a little cheaper than a real 12-megapixel photo's; the IDCT and resize work is the same.

Threads: OMP_NUM_THREADS=1 and torch.set_num_threads(1) in this process (set before torch is
imported); Pillow decodes and resizes on one thread; DataLoader workers run one torch thread
each (torch's default in workers). So (a) and (c) use 2 processes, (b), (d), (e) one.

Before timing, every file is read once so all sides see them in the page cache, and each side
runs once untimed (imports, first-call costs). Results:
benchmarks/results/decode_speed/<name>.{json,csv} (default results.json, results.csv: every repeat's seconds, medians,
img/s, CPU ms per image (user + system of the process and its reaped workers: the work
done, which other jobs on a shared machine change little, unlike wall time), ratios a/b and a/c
of the median wall times, the command, the load average after each repeat).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CI", "1")  # no progress bars from tidal.progress

import argparse
import csv
import json
import platform
import shlex
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

from provenance import code_version  # noqa: E402  (benchmarks/provenance.py, beside this file)

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "results" / "decode_speed"
ANTS_BEES = REPO.parent / "shared" / "data" / "ants-bees.tar.gz"
SIZE = 224
PHONE_W, PHONE_H = 4000, 3000
JPEG_SUFFIXES = (".jpg", ".jpeg")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="repeats per side (alternated); default 5")
    p.add_argument("--phone", default="48", help="phone-size set sizes, comma-separated (default 48; 0: none)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for (a) and (c) (default 2)")
    p.add_argument("--work", default="/tmp/tidal-decode-speed", help="unpacked and generated files, caches")
    p.add_argument("--tar", default=str(ANTS_BEES), help="ants-bees.tar.gz")
    p.add_argument("--out", default=str(OUT), help="results folder (default benchmarks/results/decode_speed)")
    p.add_argument("--name", default="results", help="result files <out>/<name>.{json,csv} (default results)")
    return p.parse_args(argv)


# --- the files -----------------------------------------------------------------------------------

def ants_bees(work: Path, tar: Path) -> Path:
    """An image folder <class>/<file> of the ants-bees JPEGs (train and test together)."""
    root = work / "ants-bees-jpeg"
    if (root / ".done").is_file():
        return root
    raw = work / "raw"
    if not (raw / "ants-bees").is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as tf:
            tf.extractall(raw, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    for path in sorted((raw / "ants-bees").glob("*/*/*")):
        if path.suffix.lower() in JPEG_SUFFIXES:
            dest = root / path.parent.name / f"{path.parent.parent.name}-{path.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    (root / ".done").touch()
    return root


def phone_photos(work: Path, source: Path, n: int) -> Path:
    """n 4000×3000 JPEGs (quality 90) upscaled from the first n ants-bees JPEGs."""
    from PIL import Image, ImageOps

    root = work / f"phone-{n}"
    if (root / ".done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    sources = image_files(source)
    if n > len(sources):
        raise SystemExit(f"--phone {n}: ants-bees has {len(sources)} JPEGs")
    for path in sources[:n]:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            photo = ImageOps.fit(im, (PHONE_W, PHONE_H), method=Image.Resampling.BICUBIC)
        dest = root / Path(path).parent.name / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        photo.save(dest, "JPEG", quality=90)
    (root / ".done").touch()
    return root


def image_files(root: Path) -> list[str]:
    """Every JPEG of root/<class>/, in torchvision ImageFolder's order (class, then name)."""
    return [str(p) for c in sorted(d for d in root.iterdir() if d.is_dir())
            for p in sorted(c.iterdir()) if p.suffix.lower() in JPEG_SUFFIXES]


def warm(files: list[str]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            total += len(fh.read())
    return total


# --- the sides -----------------------------------------------------------------------------------

def side_ours(files: list[str], cache: Path, workers: int) -> np.ndarray:
    from tidal.data.cache import decoded_pool, file_stat_entry

    entries = [file_stat_entry(Path(f), f) for f in files]
    pool = decoded_pool("imagefolder", files, entries, lambda i: files[i], SIZE, "center-crop",
                        directory=cache, workers=workers)
    if pool.bad:
        raise RuntimeError(f"ours refused {pool.bad[:3]}")
    return pool.images


def side_today(files: list[str]) -> np.ndarray:
    """202c0a2's decode_images (one process, no resize), plus the same Pillow resize, no draft."""
    from PIL import Image, ImageOps

    from tidal.data.cache import GRAY_MODES

    arrays = []
    for path in files:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if im.mode in GRAY_MODES else "RGB")
            im = ImageOps.fit(im, (SIZE, SIZE), method=Image.Resampling.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.uint8))
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    out = np.empty((len(arrays), channels, SIZE, SIZE), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    return out


def side_torchvision(root: Path, workers: int) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(
        [transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.PILToTensor()]))
    batches = [x for x, _ in DataLoader(ds, batch_size=32, num_workers=workers)]
    return torch.cat(batches).numpy()


def side_decode_one_process(files: list[str]) -> np.ndarray:
    from tidal.data.decode import decode

    out = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
    for i, path in enumerate(files):
        out[i] = decode(path, False, SIZE, "center-crop")
    return out


def side_probe(files: list[str]) -> list:
    from tidal.data.cache import probe_files

    return probe_files(files)


SIDES = {
    "a_ours": "(a) ours: decoded_pool, workers=2 (probe + decode with draft + mmap write)",
    "b_today": "(b) today's one-process decode (HEAD~2 decode_images + Pillow fit, no draft)",
    "c_torchvision": "(c) torchvision ImageFolder + Resize + CenterCrop + PILToTensor, DataLoader(num_workers=2, batch 32)",
    "d_decode_1proc": "(d) extra: tidal.data.decode.decode (with draft), one process, no probe, no cache",
    "e_probe_1proc": "(e) extra: the header probe pass alone, one process",
}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have been waited for
    (the decode pool's and the DataLoader's workers are joined before a side returns)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run_side(side: str, files: list[str], root: Path, cache: Path, workers: int):
    if side == "a_ours":
        return side_ours(files, cache, workers)
    if side == "b_today":
        return side_today(files)
    if side == "c_torchvision":
        return side_torchvision(root, workers)
    if side == "d_decode_1proc":
        return side_decode_one_process(files)
    return side_probe(files)


def run_set(name: str, root: Path, work: Path, repeats: int, workers: int, warmup: bool = True) -> dict:
    files = image_files(root)
    n = len(files)
    nbytes = warm(files)
    from PIL import Image

    sizes = []
    for path in files:
        with Image.open(path) as im:
            sizes.append(im.size)
    print(f"{name}: {n} JPEGs, {nbytes / 1e6:.1f} MB, e.g. {sizes[0][0]}×{sizes[0][1]}", flush=True)
    order = list(SIDES)
    seconds: dict[str, list[float]] = {s: [] for s in order}
    cpu: dict[str, list[float]] = {s: [] for s in order}
    check = {}
    loads = []
    if warmup:  # one untimed round: imports (torchvision, tidal) and first-call costs
        for side in order:
            cache = work / f"cache-{name}-warmup"
            _run_side(side, files, root, cache, workers)
            shutil.rmtree(cache, ignore_errors=True)
    for r in range(repeats):
        for side in order[r % len(order):] + order[:r % len(order)]:
            cache = work / f"cache-{name}-{r}"
            shutil.rmtree(cache, ignore_errors=True)
            began, cpu_began = time.perf_counter(), _cpu_seconds()
            out = _run_side(side, files, root, cache, workers)
            seconds[side].append(time.perf_counter() - began)
            cpu[side].append(_cpu_seconds() - cpu_began)
            if side != "e_probe_1proc" and r == 0:
                check[side] = out[:].copy() if side == "a_ours" else out
            del out
            shutil.rmtree(cache, ignore_errors=True)
        loads.append(round(os.getloadavg()[0], 2))
        print(f"  repeat {r + 1}/{repeats} (load {loads[-1]}): " + ", ".join(f"{s} {seconds[s][-1]:.2f}s" for s in order), flush=True)
    medians = {s: statistics.median(v) for s, v in seconds.items()}
    record = {
        "set": name, "files": n, "megabytes": round(nbytes / 1e6, 1),
        "distinct_sizes": len(set(sizes)), "most_common_size": max(set(sizes), key=sizes.count),
        "output_shape": list(check["a_ours"].shape), "repeats": repeats, "workers": workers,
        "seconds": {s: [round(x, 3) for x in v] for s, v in seconds.items()},
        "median_s": {s: round(v, 3) for s, v in medians.items()},
        "load_avg_1min_after_each_repeat": loads,
        # CPU seconds (user + system) of this process and its reaped worker processes per side:
        # the work each side does, which other jobs on the machine do not change much
        "cpu_s": {s: [round(x, 3) for x in v] for s, v in cpu.items()},
        "median_cpu_ms_per_img": {s: round(statistics.median(v) / n * 1000, 3) for s, v in cpu.items()},
        "img_per_s": {s: round(n / v, 1) for s, v in medians.items()},
        "ratio_a_over_b": round(medians["b_today"] / medians["a_ours"], 2),
        "ratio_a_over_c": round(medians["c_torchvision"] / medians["a_ours"], 2),
        # how far the outputs are apart (draft decodes at a reduced scale before the resize;
        # torchvision resizes the whole image, then crops; Pillow's fit crops, then resizes)
        "mean_abs_diff": {f"{x}-{y}": round(float(np.abs(check[x].astype(np.int16) - check[y]).mean()), 2)
                          for x, y in (("a_ours", "b_today"), ("a_ours", "c_torchvision"),
                                       ("a_ours", "d_decode_1proc"))},
    }
    return record


def command(args: argparse.Namespace) -> str:
    return ".venv/bin/python benchmarks/decode_speed.py " + shlex.join(
        ["--repeats", str(args.repeats), "--phone", args.phone, "--workers", str(args.workers)]
        + (["--name", args.name] if args.name != "results" else []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    source = ants_bees(work, Path(args.tar))
    sets = [("ants-bees", source)]
    for n in [int(s) for s in args.phone.split(",") if s.strip() and int(s)]:
        began = time.perf_counter()
        root = phone_photos(work, source, n)
        print(f"phone-{n}: ready in {time.perf_counter() - began:.0f} s", flush=True)
        sets.append((f"phone-{n}", root))
    load = os.getloadavg()
    results = [run_set(name, root, work, args.repeats, args.workers) for name, root in sets]
    doc = {"command": command(args), "code": code_version(), "sides": SIDES, "results": results,
           "threads": "OMP_NUM_THREADS=%s, torch.set_num_threads(1); Pillow single-threaded"
                      % os.environ.get("OMP_NUM_THREADS"),
           "load_avg_at_start": [round(x, 2) for x in load], "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
           "python": platform.python_version(),
           "pillow": __import__("PIL").__version__, "torch": torch.__version__,
           "torchvision": __import__("torchvision").__version__}
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out / f"{args.name}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["set", "files", "side", "median_s", "img_per_s", "cpu_ms_per_img", "seconds", "cpu_s"])
        for r in results:
            for side in SIDES:
                writer.writerow([r["set"], r["files"], side, r["median_s"][side], r["img_per_s"][side],
                                 r["median_cpu_ms_per_img"][side], " ".join(str(x) for x in r["seconds"][side]),
                                 " ".join(str(x) for x in r["cpu_s"][side])])
    for r in results:
        print(f"{r['set']}: " + ", ".join(f"{s} {v} img/s" for s, v in r["img_per_s"].items())
              + f"; a/b {r['ratio_a_over_b']}×, a/c {r['ratio_a_over_c']}×", flush=True)
    print(f"results: {out}/{args.name}.json\ncommand: {command(args)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
