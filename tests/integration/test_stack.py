"""`tidal stack`: a real PostgreSQL, a Prefect server and an MLflow server on it, on 127.0.0.1, with
prefect.yaml's deployments and a worker; the experiment deployment run by that worker is recorded
in both servers' PostgreSQL databases, and `down` leaves no process behind. Both servers refuse
calls without the credentials `up` generated (0600 on disk, handed out in the printed exports), and
both UIs open in headless Chromium (test_ui.py's renderer) with those credentials.

PostgreSQL is a real component of the stack: without it the tests fail (`make postgres`, which
`make test` runs, installs Debian's package), they do not skip."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]



def test_postgresql_is_installed():
    from tidal.stack import _pg_bin

    assert (_pg_bin() / "initdb").is_file(), "no PostgreSQL: `make postgres` installs Debian's package"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tidal(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tidal"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_an_experiment_against_the_stack_is_in_postgres_backed_prefect_and_mlflow(tmp_path, monkeypatch):
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
        creds = json.loads((stack_dir / "credentials.json").read_text())
        assert exports == {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                           "PREFECT_API_AUTH_STRING": creds["prefect_auth_string"],
                           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"]}
        assert len(creds["prefect_auth_string"]) > 30 and len(creds["mlflow_password"]) > 30
        _check_auth(stack_dir, exports)
        again = _tidal(["stack", "up", "--dir", str(stack_dir)], env, tmp_path)
        assert again.returncode == 2 and "already running" in again.stderr
        status = _tidal(["stack", "status", "--dir", str(stack_dir)], env, tmp_path)
        assert status.returncode == 0 and status.stdout.count("running") == 4, status.stdout  # and the worker

        # The experiment deployment, run by the stack's worker.
        api = exports["PREFECT_API_URL"]
        prefect_auth = exports["PREFECT_API_AUTH_STRING"]
        deployment = _http(f"{api}/deployments/name/tidal-experiment/nightly-experiment", auth=prefect_auth)
        overrides = ["preset=debug", "experiment=on-stack", "cycles=1", f"runs_dir={tmp_path}/runs",
                     f"data_root={tmp_path}/data"]
        flow_run = _http(f"{api}/deployments/{deployment['id']}/create_flow_run",
                         {"parameters": {"params_path": "params.yaml", "overrides": overrides}}, auth=prefect_auth)
        deadline = time.monotonic() + 300
        while (state := _http(f"{api}/flow_runs/{flow_run['id']}", auth=prefect_auth)["state"]["type"]) not in (
                "COMPLETED", "FAILED", "CRASHED") and time.monotonic() < deadline:
            time.sleep(2)
        assert state == "COMPLETED", (stack_dir / "logs/worker.log").read_text()[-4000:]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", exports["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", exports["MLFLOW_TRACKING_PASSWORD"])
        client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("on-stack").experiment_id])
        assert sorted(r.data.tags["tidal.kind"] for r in runs) == ["cycle", "experiment"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        # The schedules of prefect.yaml queued their next runs; the one that ran is ours.
        flow_runs = _http(f"{api}/flow_runs/filter", {}, auth=prefect_auth)
        assert [r["id"] for r in flow_runs if r["state_type"] != "SCHEDULED"] == [flow_run["id"]]
        # Both servers keep their state in PostgreSQL: its two databases exist and hold tables.
        psql = subprocess.run([shutil.which("psql") or "psql", "-h", str(stack_dir / "pg"), "-U", "postgres",
                               "-At", "-d", "mlflow", "-c", "select count(*) from runs;"],
                              capture_output=True, text=True)
        assert psql.returncode == 0 and psql.stdout.strip() == "2", psql.stdout + psql.stderr
        # Both UIs in a browser, logged in with the printed credentials (tests/integration/test_ui.py).
        from tests.integration.test_ui import basic, expect, render

        needles = [flow_run["name"], "train-cycle-0"]
        shot = tmp_path / "prefect-flow-run.png"
        dom = render(f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run['id']}", shot, needles,
                     prefect_login=exports["PREFECT_API_AUTH_STRING"])
        expect(dom, needles, "the stack's Prefect UI", shot)
        experiment_id = client.get_experiment_by_name("on-stack").experiment_id
        needles = ["on-stack", "tidal-entropy-seed0"]
        shot = tmp_path / "mlflow-runs.png"
        dom = render(f"{exports['MLFLOW_TRACKING_URI']}/#/experiments/{experiment_id}/runs", shot, needles,
                     authorization=basic(f"admin:{exports['MLFLOW_TRACKING_PASSWORD']}"))
        expect(dom, needles, "the stack's MLflow UI", shot)
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


def _check_auth(stack_dir: Path, exports: dict[str, str]) -> None:
    """Only the stack's owner reads its credentials, and neither server answers without them."""
    for name in ("credentials.json", "stack.json", "mlflow-auth.ini"):
        assert (stack_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert (stack_dir / "artifacts").stat().st_mode & 0o777 == 0o700
    api, mlflow = exports["PREFECT_API_URL"], exports["MLFLOW_TRACKING_URI"]
    searches = [(f"{api}/deployments/filter", {}), (f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", None),
                (f"{mlflow}/ajax-api/2.0/mlflow/experiments/search?max_results=1", None)]
    for url, body in searches:
        for auth in (None, "admin:wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _http(url, body, auth=auth)
            assert refused.value.code == 401, url
    assert isinstance(_http(searches[0][0], {}, auth=exports["PREFECT_API_AUTH_STRING"]), list)
    mlflow_auth = f"{exports['MLFLOW_TRACKING_USERNAME']}:{exports['MLFLOW_TRACKING_PASSWORD']}"
    assert "experiments" in _http(searches[1][0], auth=mlflow_auth)
    # A model upload through MLflow's artifact proxy, the way a replaced pickle would come in.
    put = urllib.request.Request(f"{mlflow}/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/model.pkl",
                                 data=b"not a model", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(put, timeout=30)
    assert refused.value.code == 401
    assert list((stack_dir / "artifacts").rglob("model.pkl")) == []


def _http(url: str, body: dict | None = None, auth: str | None = None) -> dict | list:
    """A JSON call; `auth` is "user:password" for HTTP basic auth (Prefect's auth string is one)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers)
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
