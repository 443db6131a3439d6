"""Photo folders at scale: one debug cycle on image folders of 10k, 100k and 1M small JPEGs;
peak memory of each step's process, decoded-cache size and build time.

    .venv/bin/python benchmarks/photo_memory.py                          # 10k, 100k, 1M
    .venv/bin/python benchmarks/photo_memory.py --sizes 10000,100000     # resumable: done sizes are skipped

The files: an image folder <work>/<n>/data/{train,test}/c0..c3/NNNNNNN.jpg, n pool (train) files
and --test test files over 4 classes, each a JPEG (quality 75) of a random size from 12 to 24
pixels a side (about 700 bytes; one 4 KB disk block each), written from a bank of 4 × 1,024
seeded encodings (a class colour, a gradient and noise). `image_size` (default 16) makes the
decoder resize every one (center-crop), so the cache holds (n + test) × 3 × 16 × 16 bytes.

Each size, every step in a fresh process (`python benchmarks/photo_memory.py --phase ...`), all
with the experiment's params (`preset=debug`, dataset=imagefolder, image_size, subset_size=null
so scoring reads every unlabeled pool file, strategy tidal-entropy, tracking off, cpu):

  cache    `load_dataset` with an empty cache dir: the decoded cache is built (probe + decode in
           `decode_workers()` forked processes); then loaded again from the cache, timed
  load     `inputs.dataset_for` alone, with the cache built: what every later step pays to list
           the folder and map the cache
  prepare  `experiment.prepare_data` (materialize, the DVC-style md5 of data_root: every file read
           once, memoized in the cache dir) and `start_experiment`, as the flow's first tasks do
  train    `pipeline.train_step(params, 0)`: cycle 0's training (debug: 40 labels, 3 epochs)
  score    `pipeline.evaluate_step` then `pipeline.score_step` over every unlabeled candidate
           (the single-process scoring path, as `scoring.shards: 1`, the default)
  sharded  the same scoring with `scoring.shards=8` through `pipeline.score_candidates` (shards
           one after another in this process, each gathering one batch at a time), its
           scores.csv compared byte for byte with score's
  rest     `pipeline.run_cycle(params, 0)`: resumes train/evaluate/score from their files, then
           select, export the query, reveal the oracle's labels, commit
  floor    `import tidal.pipeline` and nothing else: the memory every step starts from

Peak memory: VmHWM of /proc/self/status at the end of the step (tidal.memory.peak_rss_mb), the
child's own high-water mark (not ru_maxrss, which Linux carries over from the parent across
exec); the cache step also reports its forked decode workers' ru_maxrss (RUSAGE_CHILDREN: shared
pages inherited from the fork counted). Each size writes
benchmarks/results/photo_memory/<n>.json as soon as it is measured, and README.md (the table and
the command) is rebuilt from those files; a size with a file is skipped. Once measured, a size's
generated files, cache and workspace are deleted (--keep keeps them), so 1M needs its ~4.5 GB
(files + cache + md5 memo) only while it runs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import code_version  # noqa: E402  (benchmarks/provenance.py, beside this file)

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "results" / "photo_memory"
CLASSES = 4
BANK = 1024          # distinct encodings per class
SIDES = (12, 24)     # inclusive range of each side, pixels
PHASES = ("cache", "load", "prepare", "train", "score", "sharded", "rest", "floor")
SHARDS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="pool files per run, comma-separated")
    p.add_argument("--test", type=int, default=400, help="test-split files (default 400)")
    p.add_argument("--image-size", type=int, default=16, help="params image_size (default 16)")
    p.add_argument("--work", default="/tmp/tidal-photo-memory", help="generated files, caches, workspaces")
    p.add_argument("--out", default=str(OUT), help="results folder (default benchmarks/results/photo_memory)")
    p.add_argument("--keep", action="store_true", help="keep a size's files, cache and workspace once measured")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one step, in a child process
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the files -----------------------------------------------------------------------------------

def jpeg_bank(seed: int = 0) -> list[list[bytes]]:
    """BANK small JPEG encodings per class: a class colour, a gradient, noise; random sides."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[200, 60, 60], [60, 180, 60], [60, 80, 200], [200, 190, 50]], dtype=np.float64)
    bank = []
    for c in range(CLASSES):
        encodings = []
        for _ in range(BANK):
            w, h = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
            ramp = np.linspace(-40, 40, w)[None, :, None] * rng.choice([-1, 1])
            pixels = colours[c] + ramp + rng.normal(0, 12, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=75)
            encodings.append(buf.getvalue())
        bank.append(encodings)
    return bank


def generate(root: Path, n: int, n_test: int) -> dict:
    """root/{train,test}/c<k>/<i>.jpg; returns counts, bytes and the time it took."""
    done = root / ".done.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    began = time.perf_counter()
    bank = jpeg_bank()
    rng = np.random.default_rng(1)
    total = 0
    for split, count in (("train", n), ("test", n_test)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        picks = rng.integers(0, BANK, count)
        for i in range(count):
            c = i % CLASSES
            data = bank[c][picks[i]]
            with open(root / split / f"c{c}" / f"{i:07d}.jpg", "wb") as fh:
                fh.write(data)
            total += len(data)
    info = {"pool_files": n, "test_files": n_test, "bytes": total,
            "mean_file_bytes": round(total / (n + n_test), 1),
            "generate_s": round(time.perf_counter() - began, 1)}
    done.write_text(json.dumps(info))
    return info


def du_bytes(path: Path) -> int:
    """Disk usage (allocated blocks) of everything under path."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


# --- one step, in a fresh child process ---------------------------------------------------------

def experiment_params(work: Path, n: int, image_size: int, extra: list[str] = ()) -> dict:
    from tidal.config import load_params

    return load_params(None, [
        "preset=debug", f"experiment=photo-memory-{n}", "dataset=imagefolder",
        f"data_root={work / str(n) / 'data'}", f"runs_dir={work / str(n) / 'runs'}",
        f"image_size={image_size}", "resize=center-crop", "subset_size=null", "strategy=tidal-entropy",
        "seed=0", "tracking=false", "device=cpu", *extra])


def run_phase(args: argparse.Namespace) -> dict:
    from tidal.memory import peak_rss_mb, status_kb

    work, n = Path(args.work).resolve(), args.size
    began = time.perf_counter()
    import torch

    from tidal import inputs, pipeline
    from tidal.experiment import prepare_data, start_experiment
    from tidal.workspace import workspace

    record: dict = {"import_s": round(time.perf_counter() - began, 2), "torch_threads": torch.get_num_threads(),
                    "peak_rss_mb_after_import": round(peak_rss_mb(), 1)}
    params = experiment_params(work, n, args.image_size)
    began = time.perf_counter()
    if args.phase == "cache":
        from tidal.data.cache import decode_workers
        from tidal.data.image_sources import ImageOptions
        from tidal.data.sources import load_dataset

        opts = ImageOptions.from_params(params)
        data = load_dataset(params["data_root"], "imagefolder", images=opts)
        record["build_s"] = round(time.perf_counter() - began, 2)
        record["decode_workers"] = decode_workers()
        record["pool"], record["test"] = len(data.pool_ids), len(data.test_labels)
        record["shape"] = list(data.pool_images.shape[1:])
        record["workers_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        del data
        again = time.perf_counter()
        load_dataset(params["data_root"], "imagefolder", images=opts)
        record["reload_s"] = round(time.perf_counter() - again, 2)
    elif args.phase == "load":
        data = inputs.dataset_for(params)
        record["pool"] = len(data.pool_ids)
    elif args.phase == "prepare":
        prepared = prepare_data(params)
        record["prepare_s"] = round(time.perf_counter() - began, 2)
        record["peak_rss_mb_after_prepare"] = round(peak_rss_mb(), 1)
        start_experiment(params, prepared["data_version"], prepared["pool_version"])
    elif args.phase == "train":
        record["history"] = pipeline.train_step(params, 0)["history"]
    elif args.phase in ("score", "sharded"):
        ws = workspace(params)
        checkpoint = str(ws.cycle_dir(0) / "model.pt")
        if args.phase == "score":
            record["test_accuracy"] = pipeline.evaluate_step(params, 0, checkpoint)
            record["evaluate_s"] = round(time.perf_counter() - began, 2)
            record["peak_rss_mb_after_evaluate"] = round(peak_rss_mb(), 1)
            scored = time.perf_counter()
            pipeline.score_step(params, 0, checkpoint)
            record["score_s"] = round(time.perf_counter() - scored, 2)
        else:
            single = ws.cycle_dir(0) / "scores.csv"
            kept = single.with_name("scores-single.csv")
            if single.is_file():
                single.rename(kept)
            for stale in pipeline.shards_dir(params, 0).glob("*.json"):
                stale.unlink()
            sharded = experiment_params(work, n, args.image_size, [f"scoring.shards={SHARDS}"])
            out = Path(pipeline.score_candidates(sharded, 0, checkpoint))
            record["score_s"] = round(time.perf_counter() - began, 2)
            record["matches_single_process"] = out.read_bytes() == kept.read_bytes()
    elif args.phase == "rest":
        result = pipeline.run_cycle(params, 0)
        record["cycle_seconds"] = {k: round(v, 2) for k, v in result["seconds"].items()}
    record["wall_s"] = round(time.perf_counter() - began, 2)
    record["peak_rss_mb"] = round(peak_rss_mb(), 1)
    record["rss_mb_at_end"] = round(status_kb("VmRSS") / 1024, 1)
    return record


def child(args: argparse.Namespace, phase: str, n: int) -> dict:
    work = Path(args.work).resolve()
    env = {**os.environ, "TIDAL_CACHE_DIR": str(work / str(n) / "cache"), "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--size", str(n),
           "--work", str(work), "--image-size", str(args.image_size)]
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} at {n:,} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    record = json.loads(line[len("RESULT "):])
    record["process_s"] = round(time.perf_counter() - began, 2)
    print(f"  {phase}: {json.dumps(record)}", flush=True)
    return record


# --- one size -------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, n: int) -> dict:
    work = Path(args.work).resolve()
    root = work / str(n)
    code_at_start = code_version()
    shutil.rmtree(root / "cache", ignore_errors=True)
    shutil.rmtree(root / "runs", ignore_errors=True)
    files = generate(root / "data", n, args.test)
    print(f"{n:,}: files ready ({json.dumps(files)})", flush=True)
    record = {"pool_files": n, "test_files": args.test, "image_size": args.image_size, "files": files,
              "files_on_disk_bytes": du_bytes(root / "data")}
    phases = {}
    for phase in PHASES:
        phases[phase] = child(args, phase, n)
    record["phases"] = phases
    cache = root / "cache"
    pixels = sorted(cache.glob("imagefolder-*.u8"))
    c, h, w = phases["cache"]["shape"]
    expected = (n + args.test) * c * h * w
    record["cache"] = {
        "pixel_file_bytes": pixels[0].stat().st_size if pixels else None,
        "pixel_file_on_disk_bytes": pixels[0].stat().st_blocks * 512 if pixels else None,
        "expected_bytes": expected,
        "cache_dir_on_disk_bytes": du_bytes(cache),
        "other_files": {p.name: p.stat().st_size for p in sorted(cache.iterdir()) if p.suffix != ".u8"},
        "build_s": phases["cache"]["build_s"],
        "files_per_s": round((n + args.test) / phases["cache"]["build_s"], 1),
    }
    # each step's process imports the code afresh: say if a commit landed while they ran
    record.update(code=code_at_start, code_at_end=code_version(), command=command(args), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
                  python=platform.python_version(), load_avg_at_end=[round(x, 2) for x in os.getloadavg()])
    return record


def command(args: argparse.Namespace) -> str:
    return ".venv/bin/python benchmarks/photo_memory.py " + shlex.join(
        ["--sizes", args.sizes, "--test", str(args.test), "--image-size", str(args.image_size)])


# --- report ---------------------------------------------------------------------------------------

def load_results(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob("[0-9]*.json")), key=lambda r: r["pool_files"])


def write_report(out: Path, results: list[dict]) -> None:
    if not results:
        return
    base = results[0]
    steps = ("floor", "load", "prepare", "train", "score", "sharded", "rest")
    head = "| pool files | " + " | ".join(steps) + " | cache build (s) | files/s | cache .u8 (bytes) | = (n+test)·C·H·W | cache dir on disk (MB) | files on disk (MB) |"
    rows = [head, "|" + "---|" * (len(steps) + 7)]
    commits = sorted({r.get("code", {}).get("commit", "?") for r in results})
    for r in results:
        cells = [f"{r['phases'][s]['peak_rss_mb']:,.0f}" for s in steps]
        cache = r["cache"]
        rows.append(f"| {r['pool_files']:,} | " + " | ".join(cells) + f" | {cache['build_s']:,.1f} | "
                    f"{cache['files_per_s']:,.0f} | {cache['pixel_file_bytes']:,} | "
                    f"{'yes' if cache['pixel_file_bytes'] == cache['expected_bytes'] else 'NO'} | "
                    f"{cache['cache_dir_on_disk_bytes'] / 1e6:,.0f} | {r['files_on_disk_bytes'] / 1e6:,.0f} |")
    ratios = []
    for r in results[1:]:
        parts = ", ".join(f"{s} {r['phases'][s]['peak_rss_mb'] / base['phases'][s]['peak_rss_mb']:.2f}"
                          for s in steps)
        ratios.append(f"- {r['pool_files']:,} / {base['pool_files']:,}: {parts}")
    times = ["| pool files | cache build (s) | reload (s) | load (s) | prepare (s) | train (s) | evaluate (s) "
             "| score (s) | sharded score (s) | sharded = single |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["phases"]
        times.append(f"| {r['pool_files']:,} | {p['cache']['build_s']} | {p['cache']['reload_s']} | "
                     f"{p['load']['wall_s']} | {p['prepare']['prepare_s']} | {p['train']['wall_s']} | "
                     f"{p['score']['evaluate_s']} | {p['score']['score_s']} | {p['sharded']['score_s']} | "
                     f"{p['sharded']['matches_single_process']} |")
    last = results[-1]
    text = f"""# Photo folders at scale: memory of one debug cycle, cache size and build time

Written by `benchmarks/photo_memory.py` (see its docstring). Command, from the repository root:

```bash
{last['command']}
```

Measured at commit(s) {', '.join(commits)}. Machine: {last['machine']}, shared with other work. Peak resident memory (MB, VmHWM) of each
step's own fresh process:

{chr(10).join(rows)}

Steps: floor = `import tidal.pipeline` only; load = `dataset_for`; prepare = `prepare_data` +
`start_experiment`; train = `train_step`; score = `evaluate_step` + `score_step` (every unlabeled
file a candidate); sharded = the same scoring with `scoring.shards={SHARDS}`; rest = `run_cycle`
resuming (select, export, commit). The cache dir also holds the md5 memo of data_root
(`tidal.data.version`), which grows with the file count.

Peak RSS relative to the smallest size:

{chr(10).join(ratios) if ratios else '- (one size so far)'}

Times (s; wall-clock on a shared machine):

{chr(10).join(times)}
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(run_phase(args)), flush=True)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        path = out / f"{n}.json"
        if path.is_file():
            print(f"{n:,}: done ({path})", flush=True)
            continue
        record = measure(args, n)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{n:,}: written {path}", flush=True)
        write_report(out, load_results(out))
        if not args.keep:
            shutil.rmtree(Path(args.work).resolve() / str(n), ignore_errors=True)
    write_report(out, load_results(out))
    print(f"results: {out}/README.md\ncommand: {command(args)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
