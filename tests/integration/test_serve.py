"""`tidal serve` builds its deployments from prefect.yaml, the one description of them: the
deployment objects it builds, and the command itself serving them to a real Prefect server."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import yaml

from tests.integration.servers import background, free_port, http_json, wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_serve_deployments_match_prefect_yaml(monkeypatch):
    from flows.serve import deployments_from_prefect_yaml

    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = deployments_from_prefect_yaml("prefect.yaml", overrides=["train.epochs=2"])
    assert [d.name for d in deps] == [d["name"] for d in spec["deployments"]]
    assert {d.flow_name for d in deps} == {"tidal-experiment", "al-cycle", "labels-arrived"}
    for dep, declared in zip(deps, spec["deployments"]):
        assert [s.schedule.cron for s in dep.schedules or []] == [s["cron"] for s in declared.get("schedules", [])]
        assert all(s.schedule.timezone == "UTC" for s in dep.schedules or [])
        assert [t.expect for t in dep.triggers] == [set(t["expect"]) for t in declared.get("triggers", [])]
        assert dep.parameters["params_path"] == "params.yaml"
        assert dep.parameters["overrides"] == ["train.epochs=2"]


def test_tidal_serve_registers_the_deployments_on_a_real_server(tmp_path):
    """`tidal serve` itself, against a Prefect server on 127.0.0.1: every deployment of prefect.yaml
    appears with its schedules and the --set overrides, and Ctrl-C (SIGINT) stops it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"})
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(server, tmp_path / "server.log", env):
        wait_until(lambda: http_json(f"http://127.0.0.1:{port}/api/health"), 180, "Prefect server")
        with background([str(BIN / "tidal"), "serve", "--set", "train.epochs=2"], tmp_path / "serve.log", env,
                        cwd=REPO) as serving:
            found = wait_until(lambda: _served(port, len(spec["deployments"])), 180, "the served deployments")
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            serving.send_signal(signal.SIGINT)
            serving.wait(timeout=60)
    assert sorted(d["name"] for d in found) == sorted(d["name"] for d in spec["deployments"])
    by_name = {d["name"]: d for d in found}
    for declared in spec["deployments"]:
        served = by_name[declared["name"]]
        assert served["parameters"]["overrides"][-1:] == ["train.epochs=2"]
        assert sorted(s["schedule"]["cron"] for s in served["schedules"]) == sorted(
            s["cron"] for s in declared.get("schedules", []))


def _served(port: int, count: int) -> list[dict] | None:
    found = http_json(f"http://127.0.0.1:{port}/api/deployments/filter", "POST", {})
    return found if len(found) >= count else None
