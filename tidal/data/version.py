"""Data versions: a content hash of a dataset directory, and the DVC pin around it.

The hash is our own (sha256 over sorted relative paths and file bytes), so it is cheap and
needs no DVC; `dvc_status` asks the real DVC whether the directory still matches `data.dvc`.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path


def content_hash(directory: str | Path) -> str:
    """sha256 of every file's relative path and bytes, in sorted order; short hex."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def dvc_pin_file(repo_root: str | Path, data_root: str | Path) -> Path | None:
    """The `.dvc` file that pins data_root in repo_root, if there is one (e.g. data.dvc)."""
    pin = Path(repo_root) / f"{Path(data_root).name}.dvc"
    return pin if pin.is_file() else None


def dvc_pin_md5(pin_file: str | Path) -> str:
    """The md5 recorded in a .dvc file (the directory's `.dir` hash without the suffix)."""
    import yaml

    outs = yaml.safe_load(Path(pin_file).read_text())["outs"]
    return str(outs[0]["md5"]).removesuffix(".dir")


def dvc_status(repo_root: str | Path, pin_file: str | Path) -> str:
    """Run `dvc status` on the pin; return its output ('' when the data matches the pin)."""
    dvc = shutil.which("dvc")
    if dvc is None:
        raise RuntimeError("the `dvc` command is not on PATH; install the project (`make run`)")
    result = subprocess.run([dvc, "status", "--quiet", str(Path(pin_file).name)], cwd=repo_root,
                            capture_output=True, text=True)
    if result.returncode == 0:
        return ""
    return (result.stdout + result.stderr).strip() or "changed"
