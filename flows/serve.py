"""`tidal serve`: the deployments of prefect.yaml, served from one process with `flow.serve`.

prefect.yaml stays the one description of the deployments (names, entrypoints, parameters,
schedules, event triggers, concurrency limits); this module only turns it into runner deployments
for users without a work pool.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron


def deployments_from_prefect_yaml(path: str | Path = "prefect.yaml",
                                  overrides: list[str] | None = None) -> list[RunnerDeployment]:
    spec = yaml.safe_load(Path(path).read_text())
    out = []
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        parameters = dict(dep.get("parameters") or {})
        if overrides:
            parameters["overrides"] = list(parameters.get("overrides") or []) + list(overrides)
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in dep.get("schedules") or []
                     if "cron" in s]
        triggers = [DeploymentEventTrigger(**t) for t in dep.get("triggers") or []]
        limit = dep.get("concurrency_limit")
        out.append(flow.to_deployment(name=dep["name"], description=dep.get("description"),
                                      parameters=parameters, schedules=schedules or None,
                                      triggers=triggers or None,
                                      concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict)
                                      else limit))
    return out


def serve(path: str | Path = "prefect.yaml", overrides: list[str] | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments_from_prefect_yaml(path, overrides))
