"""`tidal stack`: a real PostgreSQL, a Prefect server and an MLflow server on it, on 127.0.0.1, with
prefect.yaml's deployments and a worker; the experiment deployment run by that worker is recorded
in both servers' PostgreSQL databases, and `down` leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

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
                     "--mlflow-port", str(mlflow_port), "--project", str(REPO)], env, tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        assert exports == {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        again = _tidal(["stack", "up", "--dir", str(stack_dir)], env, tmp_path)
        assert again.returncode == 2 and "already running" in again.stderr
        status = _tidal(["stack", "status", "--dir", str(stack_dir)], env, tmp_path)
        assert status.returncode == 0 and status.stdout.count("running") == 4, status.stdout  # and the worker

        # The experiment deployment, run by the stack's worker.
        api = exports["PREFECT_API_URL"]
        deployment = _http(f"{api}/deployments/name/tidal-experiment/nightly-experiment")
        overrides = ["preset=debug", "experiment=on-stack", "cycles=1", f"runs_dir={tmp_path}/runs",
                     f"data_root={tmp_path}/data"]
        flow_run = _http(f"{api}/deployments/{deployment['id']}/create_flow_run",
                         {"parameters": {"params_path": "params.yaml", "overrides": overrides}})
        deadline = time.monotonic() + 300
        while (state := _http(f"{api}/flow_runs/{flow_run['id']}")["state"]["type"]) not in (
                "COMPLETED", "FAILED", "CRASHED") and time.monotonic() < deadline:
            time.sleep(2)
        assert state == "COMPLETED", (stack_dir / "logs/worker.log").read_text()[-4000:]
        client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("on-stack").experiment_id])
        assert sorted(r.data.tags["tidal.kind"] for r in runs) == ["cycle", "experiment"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        # The schedules of prefect.yaml queued their next runs; the one that ran is ours.
        flow_runs = _http(f"{api}/flow_runs/filter", {})
        assert [r["id"] for r in flow_runs if r["state_type"] != "SCHEDULED"] == [flow_run["id"]]
        # Both servers keep their state in PostgreSQL: its two databases exist and hold tables.
        psql = subprocess.run([shutil.which("psql") or "psql", "-h", str(stack_dir / "pg"), "-U", "postgres",
                               "-At", "-d", "mlflow", "-c", "select count(*) from runs;"],
                              capture_output=True, text=True)
        assert psql.returncode == 0 and psql.stdout.strip() == "2", psql.stdout + psql.stderr
    finally:
        down = _tidal(["stack", "down", "--dir", str(stack_dir)], env, tmp_path)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    again = _tidal(["stack", "down", "--dir", str(stack_dir)], env, tmp_path)
    assert again.returncode == 0 and "nothing to stop" in again.stdout, again.stdout + again.stderr
    status = _tidal(["stack", "status", "--dir", str(stack_dir)], env, tmp_path)
    assert status.returncode == 1 and "no team stack" in status.stdout
    # No PostgreSQL or MLflow (their command lines name the folder), no Prefect server (its port),
    # no worker of this stack (the pool, and this stack's Prefect API in its environment: other
    # tests' workers may run beside this one).
    api = b"127.0.0.1:%d" % prefect_port
    leftovers = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                 and (str(stack_dir).encode() in _cmdline(p) or b"--port\x00%d" % prefect_port in _cmdline(p)
                      or b"worker\x00start" in _cmdline(p) and b"tidal-pool" in _cmdline(p)
                      and api in _environ(p))]
    assert leftovers == []
    shutil.rmtree(root, ignore_errors=True)


def _http(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _environ(proc: Path) -> bytes:
    try:
        return (proc / "environ").read_bytes()
    except OSError:
        return b""
