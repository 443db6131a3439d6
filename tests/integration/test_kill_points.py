"""benchmarks/kill_points.py: an experiment SIGKILLed at a random moment ends where an uninterrupted
one ends, and a point whose end state is broken on purpose is reported as failed.

One cycle (run, import, final run) instead of the benchmark's three keeps this to a few minutes:
the reference and one kill point, each command a real `tidal` subprocess with MLflow tracking on
and its own temporary Prefect server.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes in /proc (Linux)")


@pytest.fixture(scope="module")
def kill_points(tmp_path_factory):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_points.py"
    spec = importlib.util.spec_from_file_location("benchmarks_kill_points", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tmp = tmp_path_factory.mktemp("kill-points")
    # Seed 17: point 0 kills `tidal run` of cycle 0 at 22 % of its reference time. The command
    # takes 27-67 s here depending on the load, so the kill comes well before its end even when
    # the reference ran on a busy machine and the point on a quiet one (a draw at 52 % of the
    # 6-21 s import once ended before its kill).
    argv = ["--points", "1", "--seed", "17", "--cycles", "1", "--out", str(tmp / "out"), "--work", str(tmp / "work")]
    return {"module": module, "tmp": tmp, "result": module.main(argv)}


def test_a_killed_point_ends_as_the_reference(kill_points):
    result, out = kill_points["result"], kill_points["tmp"] / "out"
    assert result["ran"] == [0] and result["passed"] == [0] and result["failed"] == []
    point = json.loads((out / "points/0.json").read_text())
    assert point["passed"], {k: v for k, v in point["checks"].items() if not v["passed"]}
    assert set(point["checks"]) == set(kill_points["module"].CHECKS)
    assert point["killed"] and any(c["rc"] == -9 and c["killed"] for c in point["commands"])
    assert "state" in point["left_by_kill"] and "MLflow:" in point["left_by_kill"]  # what the kill left
    readme = (out / "README.md").read_text()
    assert "Points run: **1**; passed: **1**; failed: **0**" in readme
    assert "--points 1 --seed 17 --cycles 1" in readme
    # Rerun: the finished point is skipped, nothing is run.
    again = kill_points["module"].main(["--points", "1", "--seed", "17", "--cycles", "1", "--out", str(out)])
    assert again["ran"] == [] and again["skipped"] == [0]


def test_a_point_with_a_broken_end_state_is_reported_failed(kill_points):
    """Point 0's end state with one label of its labels log changed and one MLflow metric step
    written twice, checked again against the reference: exactly what was broken fails, the rest
    passes, and the report lists the failures."""
    from mlflow import MlflowClient

    module, tmp = kill_points["module"], kill_points["tmp"]
    work, exp = module.Work(tmp / "work", cycles=1, timeout=600), "kp-0"
    log = work.repo / "data/labels" / f"{exp}.csv"
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["label"] = str((int(rows[0]["label"]) + 1) % 10)  # one label changed
    with open(log, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # Two CPU samples at step 0 of cycle 0's run (system metrics are not compared with the
    # reference's, so only the repeated step shows).
    cycle_run = json.loads((work.repo / "runs" / exp / "state.json").read_text())["tracking"]["cycle_runs"]["0"]
    client = MlflowClient(tracking_uri=work.uri)
    for value, stamp in ((1.0, 1_000), (2.0, 2_000)):
        client.log_metric(cycle_run, "system/cpu_utilization_percentage", value, timestamp=stamp, step=0)

    ref = json.loads((tmp / "out/reference.json").read_text())
    checks = module.check_point(work, exp, ref["snapshot"], {"ok": True, "error": ""})
    failed = sorted(name for name, check in checks.items() if not check["passed"])
    assert failed == ["dvc_pin", "dvc_status", "labels_log", "mlflow_steps"], checks
    assert "[0]" in checks["labels_log"]["detail"]
    assert "cycle-0" in checks["mlflow_steps"]["detail"]
    assert "system/cpu_utilization_percentage: step(s) [0]" in checks["mlflow_steps"]["detail"]
    # The report of a results folder holding that point says it failed and why.
    record = {**json.loads((tmp / "out/points/0.json").read_text()), "checks": checks, "passed": False,
              "failed": failed}
    out = tmp / "out-broken"
    (out / "points").mkdir(parents=True)
    (out / "points/0.json").write_text(json.dumps(record))
    module.rebuild_report(out, "benchmarks/kill_points.py --points 1 --seed 17 --cycles 1", ref)
    readme = (out / "README.md").read_text()
    assert "passed: **0**; failed: **1**" in readme and "## Failures" in readme
    assert "`labels_log`:" in readme
