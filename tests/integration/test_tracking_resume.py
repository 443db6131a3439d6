"""SIGKILL around the MLflow calls, rerun: one parent run, one run and one model per cycle,
every metric step once.

A run created by a process killed before the workspace saved its id is found again (not left
behind as a second, forever-RUNNING run), and a cycle redone after its results were logged does
not log them twice. Real MLflow sqlite store, real Prefect test harness, the `tidal` CLI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidal.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("point", ["tracking:parent-created", "tracking:cycle-created", "train:saved",
                                   "tracking:model-created", "tracking:cycle-logged"])
def test_a_run_killed_around_tracking_leaves_one_run_per_cycle(prefect_harness, tmp_path, point):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "CI": "1", "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": uri,
           "TIDAL_FAILPOINT": point}
    sets = ["preset=debug", "experiment=tracked", f"runs_dir={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}",
            "tracking=true"]
    args = ["run", *sum((["--set", s] for s in sets), [])]
    killed = _run(args, env, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    env.pop("TIDAL_FAILPOINT")
    rerun = _run(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    kinds = Counter(r.data.tags.get("tidal.kind") for r in runs)
    assert kinds == {"experiment": 1, "cycle": 2}, [(r.info.run_name, r.info.status) for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags["tidal.kind"] == "experiment")
    cycles = sorted((r for r in runs if r.data.tags["tidal.kind"] == "cycle"), key=lambda r: r.data.tags["cycle"])
    assert [r.data.tags["cycle"] for r in cycles] == ["0", "1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in cycles} == {parent.info.run_id}
    for run in [parent, *cycles]:
        for key in ("accuracy", "n_labeled", "train_loss", "accuracy_by_cycle"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")) == [40, 60]
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted((m.source_run_id, m.name, str(m.status)) for m in models) == sorted(
        (r.info.run_id, f"cycle-{r.data.tags['cycle']}", "READY") for r in cycles)
    for run in cycles:
        assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 1
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3  # debug: 3 epochs


@pytest.mark.parametrize("validation_size", [0, 300])
def test_the_split_the_accuracy_is_measured_on_is_recorded(mlflow_uri, tmp_path, data_root, validation_size):
    """`accuracy` is on the test split, or on the validation split with validation_size > 0:
    eval.json, metrics.json and the MLflow parent run's tag say which."""
    from mlflow import MlflowClient

    from tidal import pipeline
    from tidal.config import load_params
    from tidal.experiment import prepare_data, start_experiment
    from tidal.tracking import EVAL_SPLIT_TAG, MlflowTracker, experiment_run
    from tidal.workspace import read_json, workspace

    split = "validation" if validation_size else "test"
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={data_root}", "cycles=1",
                                f"validation_size={validation_size}", f"experiment=split-{split}"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    parent = experiment_run(MlflowTracker(), params, prepared["data_version"])
    pipeline.run_cycle(params, 0)
    ws = workspace(params)
    evaluated = read_json(ws.cycle_dir(0) / "eval.json")
    assert evaluated["split"] == split
    assert evaluated["n_evaluated"] == (300 if validation_size else 359)  # digits' test split: 359 images
    assert read_json(ws.metrics_path)["split"] == split
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(parent)
    assert run.data.tags[EVAL_SPLIT_TAG] == split
    assert run.data.params["validation_size"] == str(validation_size)
