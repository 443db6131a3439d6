"""A full disk and a read-only workspace: one clear error, nothing half-written, and a rerun
with space completes to the state of an uninterrupted run. The workspace is a small tmpfs
mounted by the test (the suite runs as root, on the development machine and in CI)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tidal.cli import main as tidal_main


def _sets(runs: Path, data: Path) -> list[str]:
    return ["--set", "preset=debug", "--set", "tracking=false", "--set", "experiment=disk",
            "--set", f"runs_dir={runs}", "--set", f"data_root={data}"]


def _mount(point: Path, options: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"this test mounts a tmpfs and must run as root: {done.stderr}"


def _remount(point: Path, options: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,{options}", str(point)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    point = tmp_path / "small-disk"
    yield point
    subprocess.run(["umount", str(point)], capture_output=True)


def test_full_then_read_only_workspace_fails_clearly_and_resumes(prefect_harness, tmp_path, tmpfs, capsys):
    data = tmp_path / "data"
    assert tidal_main(["run", *_sets(tmp_path / "ref", data)]) == 0
    reference = tmp_path / "ref/disk"
    size = sum(len(b) for b in _files(reference).values())
    capsys.readouterr()

    # Room for about half the workspace: the run stops part-way with one clear error.
    _mount(tmpfs, f"size={size // 2 // 4096 * 4096}")
    assert tidal_main(["run", *_sets(tmpfs, data)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "run the same command again" in err, err
    left = _files(tmpfs)
    assert not [p for p in left if p.endswith(".tmp")], left.keys()  # no torn temp file
    assert not (tmpfs / "disk/.lock").exists()
    if (tmpfs / "disk/state.json").exists():
        json.loads((tmpfs / "disk/state.json").read_text())  # whole, never torn

    # Read-only: refused with the reason, and nothing changes.
    _remount(tmpfs, "ro")
    assert tidal_main(["run", *_sets(tmpfs, data)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert _files(tmpfs) == left

    # With space again the same command resumes to the uninterrupted run's end state.
    _remount(tmpfs, "rw,size=256m")
    assert tidal_main(["run", *_sets(tmpfs, data)]) == 0
    resumed = tmpfs / "disk"
    for name in ("learning_curve.csv", "metrics.json", "cycles/0/query.csv", "cycles/1/scores.csv"):
        # query.csv names the PNGs under each workspace: compare it relative to the workspace
        assert ((resumed / name).read_text().replace(str(resumed), "WS")
                == (reference / name).read_text().replace(str(reference), "WS")), name
    assert ((resumed / "cycles/0/images").is_dir()
            and {p.name: p.read_bytes() for p in (resumed / "cycles/0/images").iterdir()}
            == {p.name: p.read_bytes() for p in (reference / "cycles/0/images").iterdir()})
