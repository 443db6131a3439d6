"""kill_points.py (beside this file): the suite's CI-sized subset of kill points, and a point whose end
state is broken on purpose reported as failed.

Ten points of a 1-cycle experiment (run, import, final run) in the command scope: the reference
runs once, uninterrupted, saving its state before each command; each point restores the state
before its drawn command, SIGKILLs that command at a random moment, reruns it and checks the state
right after it against the reference's there. Each command is a real `tidal` subprocess with
MLflow tracking on and its own temporary Prefect server. The benchmark's 100 points (the sequence
scope: each point replays and finishes the whole experiment) are in
benchmarks/results/kill_points/README.md.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import kill_points as harness
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes in /proc (Linux)")

POINTS, SEED = 10, 3
ARGV = ["--points", str(POINTS), "--seed", str(SEED), "--cycles", "1", "--scope", "command"]


def test_a_point_rerun_in_a_kept_work_folder_gets_a_new_name(tmp_path):
    """A point stopped part way leaves its experiment (sequence scope) or its logs (command scope) in
    a kept work folder; its rerun is kp-<k>-try<n>, so nothing of the unfinished attempt is mixed in."""
    work = harness.Work(tmp_path, cycles=1, timeout=60)
    assert harness._experiment_name(work, 4) == "kp-4"
    (work.repo / "runs" / "kp-4").mkdir(parents=True)
    assert harness._experiment_name(work, 4) == "kp-4-try2"
    work.point_dir("kp-4-try2").mkdir(parents=True)
    assert harness._experiment_name(work, 4) == "kp-4-try3"


@pytest.fixture(scope="module")
def kill_points(tmp_path_factory):
    module = harness
    tmp = tmp_path_factory.mktemp("kill-points")
    argv = [*ARGV, "--out", str(tmp / "out"), "--work", str(tmp / "work")]
    return {"module": module, "tmp": tmp, "result": module.main(argv)}


def test_ten_killed_points_end_as_the_reference(kill_points):
    module, result, out = kill_points["module"], kill_points["result"], kill_points["tmp"] / "out"
    assert result["ran"] == list(range(POINTS)) and result["failed"] == [], result
    points = [json.loads((out / f"points/{k}.json").read_text()) for k in range(POINTS)]
    for point in points:
        assert point["passed"], (point["point"], {k: v for k, v in point["checks"].items() if not v["passed"]})
        assert set(point["checks"]) == set(module.CHECKS) and point["scope"] == "command"
        assert point["experiment"] == module.REFERENCE
    # Seed 3 draws every command of the sequence; a kill in the first 30 % of its command's reference
    # time comes before the command ends on any load (the fastest such command takes seconds).
    early = [p for p in points if p["fraction"] < 0.3]
    assert {p["killed_step"] for p in early} == {"run cycle 0", "import cycle 0", "final run"}
    for point in early:
        assert point["killed"] and [c["rc"] for c in point["commands"]] == [-9, 0], point["commands"]
        assert "MLflow:" in point["left_by_kill"]  # what the kill left, read before the rerun
    readme = (out / "README.md").read_text()
    assert f"Points run: **{POINTS}**; passed: **{POINTS}**; failed: **0**" in readme
    assert "--scope command" in readme
    # The work folder is back at the reference's end; a rerun skips the finished points.
    assert module.snapshot(module.Work(kill_points["tmp"] / "work", cycles=1, timeout=600), module.REFERENCE) == \
        json.loads((out / "reference.json").read_text())["snapshot"]
    again = module.main([*ARGV, "--out", str(out)])
    assert again["ran"] == [] and again["skipped"] == list(range(POINTS))
    with pytest.raises(SystemExit, match="--scope command, now .* --scope sequence"):
        module.main(["--points", str(POINTS + 1), "--seed", str(SEED), "--cycles", "1", "--out", str(out)])
    # A kept work folder resumes: its reference is reused, not rerun, and first put back at its end,
    # whatever a point stopped part way left there (here: the experiment's state.json gone).
    work_dir = kill_points["tmp"] / "work"
    reference_before = (work_dir / "reference.json").read_text()
    reported_before = (out / "reference.json").read_text()  # holds the end snapshot, read from the work folder
    (work_dir / "repo/runs" / module.REFERENCE / "state.json").unlink()
    more = module.main(["--points", str(POINTS + 1), *ARGV[2:], "--out", str(out), "--work", str(work_dir)])
    assert more["ran"] == [POINTS] and more["failed"] == [] and more["skipped"] == list(range(POINTS))
    assert (work_dir / "reference.json").read_text() == reference_before
    assert (out / "reference.json").read_text() == reported_before


def test_a_point_with_a_broken_end_state_is_reported_failed(kill_points):
    """The reference's end state with one label of its labels log changed and one MLflow metric step
    written twice, checked again against the reference: exactly what was broken fails, the rest
    passes, and the report lists the failures."""
    from mlflow import MlflowClient

    module, tmp = kill_points["module"], kill_points["tmp"]
    work, exp = module.Work(tmp / "work", cycles=1, timeout=600), module.REFERENCE
    work.restore_state("end")
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
    work.restore_state("end")
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
    module.rebuild_report(out, "tests/integration/kill_points.py " + " ".join(ARGV), ref)
    readme = (out / "README.md").read_text()
    assert "passed: **0**; failed: **1**" in readme and "## Failures" in readme
    assert "`labels_log`:" in readme
