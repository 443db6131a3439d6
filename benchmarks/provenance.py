"""Which code a benchmark measured: imported by the benchmark scripts beside this file."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version() -> dict:
    """The commit measured, and whether tidal/ differed from it (other work edits the checkout)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "tidal_modified": bool(git("status", "--porcelain", "tidal"))}
