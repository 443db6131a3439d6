"""`tidal stack`: a real PostgreSQL, a Prefect server and an MLflow server on it, on 127.0.0.1; an
experiment run against them is recorded in both, and `down` leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not Path("/usr/lib/postgresql").is_dir() and shutil.which("postgres") is None,
                                reason="needs Debian's postgresql package (the machine and CI have it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tidal(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tidal"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_an_experiment_against_the_stack_is_in_postgres_backed_prefect_and_mlflow(tmp_path):
    from mlflow import MlflowClient

    # PostgreSQL runs as the `postgres` user when the tests run as root: its folder's parents must
    # be enterable by it, which pytest's own tmp folders (0700) are not.
    root = Path(tempfile.mkdtemp(prefix="tidal-stack-"))
    root.chmod(0o755)
    stack_dir = root / "stack"
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "CI": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        up = _tidal(["stack", "up", "--dir", str(stack_dir), "--prefect-port", str(prefect_port),
                     "--mlflow-port", str(mlflow_port)], env, tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        assert exports == {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        again = _tidal(["stack", "up", "--dir", str(stack_dir)], env, tmp_path)
        assert again.returncode == 2 and "already running" in again.stderr
        status = _tidal(["stack", "status", "--dir", str(stack_dir)], env, tmp_path)
        assert status.returncode == 0 and status.stdout.count("running") == 3, status.stdout

        run = _tidal(["run", "--set", "preset=debug", "--set", "experiment=on-stack", "--set", "cycles=1",
                      "--set", f"runs_dir={tmp_path}/runs", "--set", f"data_root={tmp_path}/data"],
                     {**env, **exports}, tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("on-stack").experiment_id])
        assert sorted(r.data.tags["tidal.kind"] for r in runs) == ["cycle", "experiment"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        request = urllib.request.Request(f"{exports['PREFECT_API_URL']}/flow_runs/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            flow_runs = json.loads(answer.read())
        assert [(r["name"] != "", r["state_type"]) for r in flow_runs] == [(True, "COMPLETED")]
        # Both servers keep their state in PostgreSQL: its two databases exist and hold tables.
        psql = subprocess.run([shutil.which("psql") or "psql", "-h", str(stack_dir / "pg"), "-U", "postgres",
                               "-At", "-d", "mlflow", "-c", "select count(*) from runs;"],
                              capture_output=True, text=True)
        assert psql.returncode == 0 and psql.stdout.strip() == "2", psql.stdout + psql.stderr
    finally:
        down = _tidal(["stack", "down", "--dir", str(stack_dir)], env, tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    status = _tidal(["stack", "status", "--dir", str(stack_dir)], env, tmp_path)
    assert status.returncode == 1 and "no team stack" in status.stdout
    # No PostgreSQL or MLflow (their command lines name the folder) and no Prefect server (its port).
    leftovers = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                 and (str(stack_dir).encode() in _cmdline(p) or b"--port\x00%d" % prefect_port in _cmdline(p))]
    assert leftovers == []
    shutil.rmtree(root, ignore_errors=True)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
