"""Scale benchmark: score a pool of 1,000,000 images in shards on Dask workers; memory flat in size.

    .venv/bin/python benchmarks/scale.py                   # 100k, 300k and 1M candidates
    .venv/bin/python benchmarks/scale.py --sizes 100000,1000000 --shards 8 --workers 2

The pool: 1,000,000 synthetic 1×8×8 uint8 images (each one of scikit-learn's embedded 8×8
digits plus seeded noise, labelled with its digit), written once as memory-mapped .npy files
under benchmarks/results/scale/data/ (git-ignored) and read through the `npy` source. Why 8×8:
a million of them are 64 MB, so the pool is written in seconds and the small CNN scores it in
minutes on 2 CPU cores; 3×32×32 images would be 3 GB and ~16× the compute, measuring the same
thing (whether memory grows with the number of candidates) only more slowly.

For each size n, an experiment `scale-<n>` (seed 0, 100 initial labels, budget 1,000 = the k
each shard returns, subset_size=n, strategy tidal-entropy) trains cycle 0 (2 epochs: the model's
quality is not what is measured) and then scores it end to end through the sharded Dask path,
`flows.experiment.score_in_shards`: a fresh `LocalCluster` of --workers processes (one thread
each), --shards `score-shard` Prefect tasks mapped on it, then the merge into scores.csv. Each
shard task returns its worker's peak resident memory so far (VmHWM of /proc/self/status, see
`tidal.memory.peak_rss_mb`: the peak since the worker started, imports of torch, prefect and
distributed included; not ru_maxrss, which on Linux also counts the flow process the worker was
spawned from); every size gets fresh workers, so its peaks are its own. Sizes up to --check-up-to are also scored by the
single-process `score_step` and the two scores.csv compared byte for byte.

Resumable: each size writes benchmarks/results/scale/<n>.json when done and is skipped when its
file exists; a size killed half-way keeps its trained model (runs/, git-ignored) but scores all
of its shards again, so that its time is whole. After each size, README.md (table + command) and scale.png (memory and time vs candidates) are rebuilt from
the result files. The Prefect temporary server keeps its home in results/scale/prefect-home/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "results" / "scale"
POOL_SIZE = 1_000_000
TEST_SIZE = 2_000
CHUNK = 100_000
NOISE = 24.0  # std of the pixel noise added to each digit (pixels 0..255)
STRATEGY = "tidal-entropy"
MAX_PEAK_MB = 2048


def configure_environment(out: Path) -> None:
    """Quiet, telemetry-free Prefect with its own home; call before prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("CI", "1")  # no progress bars
    if "PREFECT_API_URL" not in os.environ:
        (out / "prefect-home").mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(out / "prefect-home"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,300000,1000000", help="candidates per run, comma-separated")
    p.add_argument("--shards", type=int, default=8, help="scoring.shards (default 8)")
    p.add_argument("--workers", type=int, default=2, help="scoring.dask_workers (default 2)")
    p.add_argument("--check-up-to", type=int, default=100_000,
                   help="also score sizes up to this with the single-process score_step and compare")
    p.add_argument("--out", default=str(OUT), help="results folder (default benchmarks/results/scale)")
    return p.parse_args(argv)


# --- the synthetic pool -----------------------------------------------------------------------

def _noisy_digits(rng: np.random.Generator, n: int, digits: np.ndarray, labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    pick = rng.integers(0, len(digits), n)
    images = digits[pick] + rng.normal(0.0, NOISE, (n, 1, 8, 8))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels[pick]


def write_pool(root: Path) -> Path:
    """data root of the `npy` source: POOL_SIZE pool images and TEST_SIZE test images, written a
    chunk at a time into memory-mapped .npy files (never the whole pool in memory)."""
    from sklearn.datasets import load_digits

    done = root / "pool_images.npy"
    if done.is_file() and np.load(done, mmap_mode="r").shape == (POOL_SIZE, 1, 8, 8):
        return root
    root.mkdir(parents=True, exist_ok=True)
    bunch = load_digits()
    digits = (bunch.images * (255.0 / 16.0))[:, None].astype(np.float32)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_images, test_labels = _noisy_digits(rng, TEST_SIZE, digits, labels)
    np.save(root / "test_images.npy", test_images)
    np.save(root / "test_labels.npy", test_labels)
    tmp = root / "pool_images.npy.tmp"
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(POOL_SIZE, 1, 8, 8))
    pool_labels = np.empty(POOL_SIZE, dtype=np.int64)
    for start in range(0, POOL_SIZE, CHUNK):
        images[start:start + CHUNK], pool_labels[start:start + CHUNK] = _noisy_digits(rng, CHUNK, digits, labels)
    images.flush()
    del images
    np.save(root / "pool_labels.npy", pool_labels)
    os.replace(tmp, done)  # last: a pool_images.npy that exists is complete
    return root


# --- one size ---------------------------------------------------------------------------------

def overrides(out: Path, size: int, args: argparse.Namespace) -> list[str]:
    return [f"experiment=scale-{size}", "dataset=npy", f"data_root={out / 'data'}", f"runs_dir={out / 'runs'}",
            f"strategy={STRATEGY}", "seed=0", "cycles=1", "initial_size=100", "budget=1000",
            f"subset_size={size}", "train.epochs=2", "train.batch_size=32", "train.milestones=[2]",
            "score_batch_size=512", "tracking=false", "device=cpu",
            f"scoring.shards={args.shards}", "scoring.task_runner=dask", f"scoring.dask_workers={args.workers}"]


def run_size(out: Path, size: int, args: argparse.Namespace) -> dict:
    from flows.experiment import score_in_shards
    from tidal.memory import peak_rss_mb
    from tidal import pipeline
    from tidal.config import load_params
    from tidal.experiment import prepare_data, start_experiment
    from tidal.workspace import workspace

    params = load_params(None, overrides(out, size, args))
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    scores = workspace(params).cycle_dir(0) / "scores.csv"
    for stale in (scores, *pipeline.shards_dir(params, 0).glob("*.json")):
        stale.unlink(missing_ok=True)  # a size killed half-way: time all of its scoring again
    began = time.perf_counter()
    result = score_in_shards(params, 0, checkpoint)
    wall = time.perf_counter() - began
    shards = result["shards"]
    workers: dict[int, float] = {}
    for shard in shards:
        workers[shard["pid"]] = max(workers.get(shard["pid"], 0.0), shard["peak_rss_mb"])
    record = {
        "candidates": shards[-1]["stop"], "pool_size": POOL_SIZE, "shards": args.shards, "workers": args.workers,
        "k": params["budget"], "strategy": STRATEGY, "image_shape": [1, 8, 8],
        "wall_s": round(wall, 2),  # LocalCluster start, the shard tasks, the merge, cluster shutdown
        "shard_seconds": [round(s["seconds"], 2) for s in shards],
        "peak_rss_mb_per_worker": sorted(round(v, 1) for v in workers.values()),
        "shards_per_worker": sorted(sum(s["pid"] == pid for s in shards) for pid in workers),
        "peak_rss_mb_per_shard": [round(s["peak_rss_mb"], 1) for s in shards],  # the worker's peak after each
        "flow_process_peak_rss_mb": round(peak_rss_mb(), 1),  # this process so far, earlier sizes included
    }
    record["candidates_per_s"] = round(record["candidates"] / sum(s["seconds"] for s in shards) * args.workers, 1)
    if size <= args.check_up_to:
        sharded = Path(result["scores"]).read_bytes()
        Path(result["scores"]).rename(scores.with_name("scores-sharded.csv"))
        single = Path(pipeline.score_step(params, 0, checkpoint)).read_bytes()
        record["matches_single_process"] = single == sharded
    record.update(command=command(args), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
                  python=platform.python_version())
    return record


def command(args: argparse.Namespace) -> str:
    return ".venv/bin/python benchmarks/scale.py " + shlex.join(
        ["--sizes", args.sizes, "--shards", str(args.shards), "--workers", str(args.workers),
         "--check-up-to", str(args.check_up_to)])


# --- report -----------------------------------------------------------------------------------

def load_results(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob("[0-9]*.json")), key=lambda r: r["candidates"])


def write_report(out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    n = [r["candidates"] for r in results]
    fig, (mem, wall) = plt.subplots(1, 2, figsize=(11, 4))
    for w in range(max(len(r["peak_rss_mb_per_worker"]) for r in results)):
        mem.plot(n, [r["peak_rss_mb_per_worker"][w] if w < len(r["peak_rss_mb_per_worker"]) else np.nan
                     for r in results], "o-", label=f"worker {w + 1}")
    mem.axhline(MAX_PEAK_MB, color="red", linestyle="--", label="2 GB limit")
    mem.set(xlabel="candidates scored", ylabel="peak resident memory per worker (MB)", ylim=(0, MAX_PEAK_MB * 1.1),
            title="Memory per Dask worker")
    mem.legend()
    wall.plot(n, [r["wall_s"] for r in results], "o-", label="end to end (cluster start + shards + merge)")
    wall.plot(n, [sum(r["shard_seconds"]) / r["workers"] for r in results], "s--",
              label="shard compute / workers")
    wall.set(xlabel="candidates scored", ylabel="seconds", title="Time")
    wall.legend()
    for ax in (mem, wall):
        ax.ticklabel_format(axis="x", style="plain")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)
    plt.close(fig)

    rows = ["| candidates | shards | workers | peak RSS per worker (MB) | wall (s) | shard compute (s, sum) "
            "| candidates/s | = single process |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        check = {True: "yes (byte for byte)", False: "**NO**", None: "not checked"}[r.get("matches_single_process")]
        rows.append(f"| {r['candidates']:,} | {r['shards']} | {r['workers']} | "
                    f"{' / '.join(f'{v:.0f}' for v in r['peak_rss_mb_per_worker'])} | {r['wall_s']:.1f} | "
                    f"{sum(r['shard_seconds']):.1f} | {r['candidates_per_s']:,.0f} | {check} |")
    last = results[-1]
    text = f"""# Scale: scoring a 1,000,000-image pool in shards on Dask workers

Written by `benchmarks/scale.py` (see its docstring). Command, from the repository root:

```bash
{last['command']}
```

Pool: {last['pool_size']:,} synthetic 1×8×8 uint8 images (scikit-learn's 8×8 digits plus noise), a 64 MB
memory-mapped `.npy` read through the `npy` source. Strategy {last['strategy']}, k = {last['k']:,} per shard,
each size with a fresh `LocalCluster` of {last['workers']} worker processes (1 thread each) running
{last['shards']} `score-shard` Prefect tasks, then the merge. Machine: {last['machine']}, CPU only,
shared with another benchmark running at the same time (times are wall-clock on a busy machine).

{chr(10).join(rows)}

- peak RSS: VmHWM (/proc/self/status) of each worker process, i.e. the most it ever held,
  including torch, prefect and distributed themselves; the limit asked for is 2,048 MB.
  (Not ru_maxrss: Linux carries the peak of the address space before exec over into it, so a
  worker spawned by the flow process would report that process's size.)
- wall: the whole `score_in_shards` call, including the cluster start and shutdown;
  shard compute: the time inside the shard steps (load data and model, draw the candidates, score);
  candidates/s = candidates / (shard compute / workers).
- "= single process": the merged `scores.csv` compared with `score_step`'s, byte for byte.
- 999,900 = every unlabeled sample: the 1,000,000-image pool less its 100 initial labels.
- Each result file also lists the worker's peak after each of its shards (`peak_rss_mb_per_shard`):
  what little the peak rises from 100k to 1M candidates accumulates over a worker's successive
  shards, which run longer (not larger) at 1M: each shard holds one batch of images, its top k
  and the candidate draw (17 bytes per pool sample, the same 1M pool at every size).

![memory and time vs candidates](scale.png)
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configure_environment(out)
    write_pool(out / "data")
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        result_path = out / f"{size}.json"
        if result_path.is_file():
            print(f"{size:,} candidates: done ({result_path})", flush=True)
            continue
        print(f"{size:,} candidates: scoring ...", flush=True)
        record = run_size(out, size, args)
        result_path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record), flush=True)
        write_report(out, load_results(out))
    write_report(out, load_results(out))
    print(f"results: {out}/README.md\ncommand: {command(args)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
