"""A validation split and an imbalanced pool of a big memory-mapped pool: the peak memory of the
process that makes them, against one that only maps the pool.

    .venv/bin/python benchmarks/view_memory.py --name after
    .venv/bin/python benchmarks/view_memory.py --name before --repo /tmp/before   # a worktree of older code

The pool: --n seeded random uint8 images of 3×--side×--side (default 200,000 × 3×64×64 = 2.46 GB)
over 10 classes and a test split of 1,000, written once as .npy files under --work and read by
the `npy` source (memory-mapped). Each phase runs in a fresh process with the `tidal` package of
--repo (default: this checkout):
  map    `load_dataset(npy)`: the pool mapped, nothing read; then 256 rows gathered
  views  the same, then what `inputs.dataset_for` makes with `validation_size: 1000` and with
         `imbalance_ratio: 2` as well (`hold_out_validation`, `imbalanced`), and 256 rows
         gathered from each view's pool, as a training or scoring step reads it
Peak resident memory is VmHWM (tidal.memory.peak_rss_mb); the result is the ratio views/map.
It writes benchmarks/results/view_memory/<name>.json and rebuilds README.md there from them.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from provenance import code_label, save_result  # benchmarks/provenance.py, beside this file

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "view_memory"


def write_pool(work: Path, n: int, side: int) -> Path:
    """The npy files of the pool (written once; a finished pool_images.npy is complete)."""
    root = work / f"npy-{n}-{side}"
    if (root / "pool_images.npy").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(root / "pool_labels.npy", rng.integers(0, 10, n).astype(np.int64))
    np.save(root / "test_labels.npy", rng.integers(0, 10, 1000).astype(np.int64))
    np.save(root / "test_images.npy", rng.integers(0, 256, (1000, 3, side, side), dtype=np.uint8))
    tmp = root / "pool_images.tmp.npy"
    pool = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, side, side))
    for start in range(0, n, 10_000):  # a block at a time: writing it never holds the pool
        stop = min(n, start + 10_000)
        pool[start:stop] = rng.integers(0, 256, (stop - start, 3, side, side), dtype=np.uint8)
    pool.flush()
    del pool
    tmp.rename(root / "pool_images.npy")
    return root


def phase(repo: Path, root: Path, which: str) -> dict:
    """One measurement in this process (run through `--phase`): peak memory in MB."""
    sys.path.insert(0, str(repo))
    import torch

    from tidal.data.dataset import hold_out_validation, imbalanced
    from tidal.data.sources import load_dataset
    from tidal.memory import peak_rss_mb

    data = load_dataset(root, "npy")
    rows = torch.arange(0, len(data.pool_ids), max(1, len(data.pool_ids) // 256))[:256]
    read = [data.pool_images[rows]]
    if which == "views":
        for view in (hold_out_validation(data, 1000, seed=0), hold_out_validation(imbalanced(data, 2.0, 0), 1000, 0)):
            read.append(view.pool_images[rows[rows < len(view.pool_ids)]])
    return {"phase": which, "peak_rss_mb": round(peak_rss_mb(), 1), "rows_read": sum(len(r) for r in read),
            "tidal": str(Path(sys.modules["tidal"].__file__).parent)}


def run_phase(repo: Path, root: Path, which: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", which, "--repo", str(repo), "--root", str(root)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rebuild_readme() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    lines = ["# A validation split and an imbalanced pool of a memory-mapped pool: peak memory", "",
             "Written by `benchmarks/view_memory.py` (its docstring says what each phase does).", "",
             "| name | code | pool | map: peak MB | views: peak MB | views / map | command |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['code']} | {r['n']:,} × 3×{r['side']}×{r['side']} ({r['pool_gb']} GB) | "
                     f"{r['map']['peak_rss_mb']} | {r['views']['peak_rss_mb']} | {r['ratio']} | `{r['command']}` |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="after", help="the result's name (its JSON file)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose tidal/ is measured (default this one)")
    p.add_argument("--n", type=int, default=200_000, help="pool images (default 200,000)")
    p.add_argument("--side", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--work", default="/tmp/view-memory", help="where the pool's npy files are written once")
    p.add_argument("--phase", choices=["map", "views"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(Path(args.repo), Path(args.root), args.phase)))
        return None
    repo = Path(args.repo).resolve()
    root = write_pool(Path(args.work), args.n, args.side)
    measured = {which: run_phase(repo, root, which) for which in ("map", "views")}
    record = {"name": args.name, "code": code_label(repo), "n": args.n,
              "side": args.side, "pool_gb": round(args.n * 3 * args.side ** 2 / 1e9, 2), **measured,
              "ratio": round(measured["views"]["peak_rss_mb"] / measured["map"]["peak_rss_mb"], 2),
              "machine": platform.processor() or platform.machine(),
              "command": ".venv/bin/python benchmarks/view_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    return save_result(OUT, args.name, record, rebuild_readme)


if __name__ == "__main__":
    main()
