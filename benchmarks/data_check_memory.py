"""The data check of a folder of many files (`verify_data_version`: DVC's md5 of data_root, with the
md5 memo in the cache dir): peak memory over the import, and time, first (every file read) and
again (the memo warm).

    .venv/bin/python benchmarks/data_check_memory.py --name after
    .venv/bin/python benchmarks/data_check_memory.py --name before --repo /tmp/before   # older code

The folder: --n files of 8 bytes under --work/data/train/c0..c9/ (written once). Each run is a
fresh process with the `tidal` package of --repo (default this checkout): the check with an empty
cache dir of the run's own (cold), then, in another fresh process, again (warm). Peak memory is
VmHWM less VmRSS after the import (tidal.memory). It writes benchmarks/results/data_check_memory/<name>.json and rebuilds
README.md there from them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import code_label, save_result  # benchmarks/provenance.py, beside this file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "data_check_memory"


def write_folder(work: Path, n: int) -> Path:
    root = work / f"files-{n}" / "data"
    if (root / "done").is_file():
        return root
    for i in range(n):
        folder = root / "train" / f"c{i % 10}"
        if i < 10:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(b"x%07d" % i)
    (root / "done").write_text("")
    return root


def check(repo: Path, root: Path, cache: Path) -> dict:
    """One check in this process (run through `--check`)."""
    import os

    sys.path.insert(0, str(repo))
    os.environ["TIDAL_CACHE_DIR"] = str(cache)
    from tidal.data.version import verify_data_version
    from tidal.memory import status_kb

    base = status_kb("VmRSS") / 1024
    began = time.perf_counter()
    version = verify_data_version(root)["data_version"]
    return {"seconds": round(time.perf_counter() - began, 2),
            "peak_over_import_mb": round(status_kb("VmHWM") / 1024 - base, 1), "data_version": version}


def rebuild_readme() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    lines = ["# The data check of a folder of many files: memory and time", "",
             "Written by `benchmarks/data_check_memory.py` (its docstring says how). Peak memory is over the import;"
             " warm = the second check, the md5 memo in place.", "",
             "| name | code | files | cold: peak MB | cold: s | warm: peak MB | warm: s | command |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['code']} | {r['n']:,} | {r['cold']['peak_over_import_mb']} | "
                     f"{r['cold']['seconds']} | {r['warm']['peak_over_import_mb']} | {r['warm']['seconds']} | "
                     f"`{r['command']}` |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="after", help="the result's name (its JSON file)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose tidal/ is measured (default this one)")
    p.add_argument("--n", type=int, default=200_000, help="files (default 200,000)")
    p.add_argument("--work", default="/tmp/data-check-memory", help="where the folder is written once")
    p.add_argument("--check", nargs=2, metavar=("ROOT", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    repo = Path(args.repo).resolve()
    if args.check:
        print(json.dumps(check(repo, Path(args.check[0]), Path(args.check[1]))))
        return None
    root = write_folder(Path(args.work), args.n)
    cache = Path(args.work) / f"cache-{args.name}"
    shutil.rmtree(cache, ignore_errors=True)
    measured = {}
    for run in ("cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--repo", str(repo), "--check", str(root), str(cache)],
                             check=True, capture_output=True, text=True).stdout
        measured[run] = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(cache, ignore_errors=True)
    record = {"name": args.name, "code": code_label(repo), "n": args.n,
              **measured,
              "command": ".venv/bin/python benchmarks/data_check_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    return save_result(OUT, args.name, record, rebuild_readme)


if __name__ == "__main__":
    main()
