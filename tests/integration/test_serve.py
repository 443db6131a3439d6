"""`tidal serve` builds its deployments from prefect.yaml, the one description of them."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


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
