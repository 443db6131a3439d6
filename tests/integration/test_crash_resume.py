"""SIGKILL at a step, rerun, and the experiment ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _overrides(runs: Path, data: Path) -> list[str]:
    return ["preset=debug", "experiment=crash", f"runs_dir={runs}", f"data_root={data}", "tracking=false"]


def _final(runs: Path) -> dict:
    ws = runs / "crash"
    state = json.loads((ws / "state.json").read_text())
    return {
        "labeled": state["labeled"],
        "cycle": state["cycle"],
        "curve": [(h["cycle"], h["n_labeled"], h["test_accuracy"]) for h in state["history"]],
        "queries": [(ws / f"cycles/{k}/query.csv").read_text() for k in range(state["cycle"])],
    }


@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory):
    from flows.experiment import experiment

    tmp = tmp_path_factory.mktemp("reference")
    experiment(params_path=None, overrides=_overrides(tmp / "runs", tmp / "data"))
    return _final(tmp / "runs")


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidal.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("point", ["train:epoch", "score:before-write", "export:after"])
def test_sigkill_then_rerun_matches_uninterrupted(prefect_harness, reference, tmp_path, point):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "CI": "1", "PREFECT_API_URL": PREFECT_API_URL.value(), "TIDAL_FAILPOINT": point}
    args = ["run", *sum((["--set", o] for o in _overrides(tmp_path / "runs", tmp_path / "data")), [])]
    killed = _cli(args, env, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ws = tmp_path / "runs/crash"
    assert (ws / ".lock").exists()  # the killed run could not clean up
    state = json.loads((ws / "state.json").read_text())
    assert state["cycle"] == 0  # killed inside cycle 0, nothing committed
    env.pop("TIDAL_FAILPOINT")
    rerun = _cli(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert not (ws / ".lock").exists()
    assert _final(tmp_path / "runs") == reference
