"""End to end as users run it: a real Prefect server, work pool, deployment from prefect.yaml
and worker, and a real MLflow server; everything on 127.0.0.1, bounded in time, stopped even
when the test fails."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import background, free_port, group_alive, http_json, wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def servers(tmp_path: Path):
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "CI": "1", "DO_NOT_TRACK": "1",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
        "PWD": str(REPO),  # prefect.yaml's pull step: run flows from the project root
    })
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1",
                  "--port", str(mlflow_port), "--workers", "1"]
    with background(prefect_cmd, tmp_path / "prefect-server.log", env) as prefect_proc, \
            background(mlflow_cmd, tmp_path / "mlflow-server.log", env) as mlflow_proc:
        wait_until(lambda: http_json(f"http://127.0.0.1:{prefect_port}/api/health"), 120, "Prefect server")
        wait_until(lambda: urlopen_ok(f"http://127.0.0.1:{mlflow_port}/health"), 120, "MLflow server")
        yield {"env": env, "prefect_api": env["PREFECT_API_URL"], "mlflow_uri": env["MLFLOW_TRACKING_URI"],
               "tmp": tmp_path, "pgids": [prefect_proc.pid, mlflow_proc.pid]}
    for pgid in (prefect_proc.pid, mlflow_proc.pid):  # no server child (e.g. MLflow's huey) is left
        wait_until(lambda: not group_alive(pgid), 10, f"exit of process group {pgid}")


def urlopen_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status == 200


def run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_scheduled_cycle_deployment_runs_on_a_worker(servers):
    env, api, tmp = servers["env"], servers["prefect_api"], servers["tmp"]
    run([str(BIN / "prefect"), "work-pool", "create", "tidal-pool", "--type", "process"], env)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)

    deployment = http_json(f"{api}/deployments/name/al-cycle/nightly-cycle")
    crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
    assert crons == ["0 3 * * *"], deployment["schedules"]
    assert http_json(f"{api}/deployments/name/tidal-experiment/nightly-experiment")["schedules"]

    overrides = ["preset=debug", "experiment=e2e-digits", f"runs_dir={tmp}/runs", f"data_root={tmp}/data"]
    flow_run = http_json(f"{api}/deployments/{deployment['id']}/create_flow_run", "POST",
                         {"parameters": {"params_path": "params.yaml", "overrides": overrides}})
    worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "tidal-pool", "--type", "process",
                  "--prefetch-seconds", "5"]
    with background(worker_cmd, tmp / "worker.log", env, cwd=REPO) as worker:
        final = wait_until(
            lambda: (lambda r: r if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None)(
                http_json(f"{api}/flow_runs/{flow_run['id']}")),
            300, "flow run", interval=2)
    wait_until(lambda: not group_alive(worker.pid), 10, "exit of the worker's process group")
    assert final["state"]["type"] == "COMPLETED", (tmp / "worker.log").read_text()[-4000:]

    # The query file exists and holds unlabeled pool ids.
    query = tmp / "runs/e2e-digits/cycles/0/query.csv"
    with open(query, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20 and [int(r["rank"]) for r in rows] == list(range(1, 21))

    # The Prefect UI shows the learning curve as a table artifact.
    artifacts = http_json(f"{api}/artifacts/filter", "POST",
                          {"artifacts": {"key": {"any_": ["learning-curve-e2e-digits"]}}})
    assert artifacts and artifacts[0]["type"] == "table"

    # MLflow, through the server's API: parent + child run with metrics, artifact and model.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["mlflow_uri"])
    exp = client.get_experiment_by_name("e2e-digits")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("tidal.kind") == "experiment"]
    child = [r for r in runs if r.data.tags.get("tidal.kind") == "cycle"]
    assert len(parent) == 1 and len(child) == 1
    assert child[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert child[0].data.tags["prefect.flow_run_id"]  # lineage back to the Prefect run
    assert child[0].data.tags["data_version"] == parent[0].data.params["data_version"]
    assert [m.step for m in client.get_metric_history(child[0].info.run_id, "train_loss")] == [1, 2, 3]
    assert 0 < child[0].data.metrics["accuracy"] <= 1
    assert [a.path for a in client.list_artifacts(child[0].info.run_id, "query")] == ["query/query.csv"]
    assert [a.path for a in client.list_artifacts(child[0].info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
    # Artifacts landed where the server keeps them, not in the working directory.
    assert any((tmp / "mlartifacts").rglob("query.csv"))
