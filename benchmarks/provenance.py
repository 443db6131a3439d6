"""Which code a benchmark measured: imported by the benchmark scripts beside this file."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version(repo: Path = REPO) -> dict:
    """The commit measured, and whether tidal/ differed from it (other work edits the checkout);
    `repo`: the checkout measured (another worktree, for a before-and-after)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=repo, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "tidal_modified": bool(git("status", "--porcelain", "tidal"))}


def code_label(repo: Path = REPO) -> str:
    """code_version as one cell of a results table: `abc1234`, or `abc1234 (tidal/ modified)`."""
    version = code_version(repo)
    return version["commit"] + (" (tidal/ modified)" if version["tidal_modified"] else "")


def save_result(out: Path, name: str, record: dict, rebuild_readme) -> dict:
    """Write out/<name>.json, rebuild the folder's README.md from its results, print the record."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    rebuild_readme()
    print(json.dumps(record, indent=1))
    return record
