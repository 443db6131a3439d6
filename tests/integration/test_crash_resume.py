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
        "curve": [(h["cycle"], h["n_labeled"], h["accuracy"]) for h in state["history"]],
        # with the workspace's own folder written as RUNS: query.csv names the PNGs written under it
        "queries": [(ws / f"cycles/{k}/query.csv").read_text().replace(str(runs), "RUNS")
                    for k in range(state["cycle"])],
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


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc (Linux)")
def test_sigterm_stops_the_run_and_its_prefect_server(tmp_path):
    """`kill PID` of `tidal run` (its own temporary Prefect server): the run exits with 143,
    releases the workspace lock and leaves no server process behind."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(CI="1", PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               TIDAL_FAILPOINT="train:epoch", TIDAL_FAILPOINT_ACTION="term")
    args = ["run", *sum((["--set", o] for o in _overrides(tmp_path / "runs", tmp_path / "data")), [])]
    proc = subprocess.Popen([sys.executable, "-m", "tidal.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        children |= _children(proc.pid)
        time.sleep(0.2)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert children, "the run started no child process (no temporary Prefect server?)"
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [c for c in children if _alive(c)], out[-3000:]
    assert not (tmp_path / "runs/crash/.lock").exists()
    assert "Crashed" in out  # Prefect recorded the run as crashed before handing the signal on
