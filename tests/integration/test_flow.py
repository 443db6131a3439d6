"""A 2-cycle experiment on digits through the real Prefect flow and a real MLflow store."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tidal.cli import main as tidal_main
from tidal.data.sources import load_dataset
from tidal.data.version import dvc_dir_md5


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["preset=debug", "experiment=it-digits", f"runs_dir={tmp_path}/runs",
            f"data_root={tmp_path}/data", *extra]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def finished_experiment(prefect_harness, mlflow_uri, tmp_path, monkeypatch):
    from flows.experiment import experiment

    monkeypatch.chdir(tmp_path)  # nothing may land in the repo
    history = experiment(params_path=None, overrides=_overrides(tmp_path))
    return {"history": history, "uri": mlflow_uri, "tmp": tmp_path}


def test_experiment_flow_writes_workspace(finished_experiment):
    tmp = finished_experiment["tmp"]
    ws = tmp / "runs" / "it-digits"
    assert [h["cycle"] for h in finished_experiment["history"]] == [0, 1]

    curve = _read_csv(ws / "learning_curve.csv")
    assert list(curve[0]) == ["strategy", "seed", "cycle", "n_labeled", "accuracy"]
    assert [(r["cycle"], r["n_labeled"]) for r in curve] == [("0", "40"), ("1", "60")]
    assert all(0.0 < float(r["accuracy"]) <= 1.0 for r in curve)

    state = json.loads((ws / "state.json").read_text())
    data = load_dataset(tmp / "data", "digits")
    pool = set(data.pool_ids)
    q0 = [r["id"] for r in _read_csv(ws / "cycles/0/query.csv")]
    q1 = [r["id"] for r in _read_csv(ws / "cycles/1/query.csv")]
    assert len(q0) == len(set(q0)) == 20 and len(q1) == len(set(q1)) == 20
    assert set(q0) <= pool and set(q1) <= pool
    initial = set(list(state["labeled"])[:40])
    # Each query holds ids that were unlabeled when it was made.
    assert not set(q0) & initial
    assert not set(q1) & (initial | set(q0))
    assert len(state["labeled"]) == 80 and state["cycle"] == 2
    # Oracle labels are the dataset's own.
    truth = dict(zip(data.pool_ids, data.pool_labels.tolist()))
    assert all(state["labeled"][i] == truth[i] for i in q0 + q1)
    assert state["data_version"] == dvc_dir_md5(tmp / "data")
    evaluated = json.loads((ws / "cycles/1/eval.json").read_text())
    assert evaluated["split"] == "test" and evaluated["n_evaluated"] == len(data.test_labels)
    assert evaluated["accuracy"] == state["history"][1]["accuracy"]
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["final_accuracy"] == evaluated["accuracy"]


def test_experiment_flow_tracks_in_mlflow(finished_experiment):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=finished_experiment["uri"])
    exp = client.get_experiment_by_name("it-digits")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tidal.kind") == "experiment"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["strategy"] == "tidal-entropy"
    assert parent.data.params["seed"] == "0"
    assert parent.data.params["dataset"] == "digits"
    assert parent.data.params["budget"] == "20"
    assert parent.data.params["data_version"] == dvc_dir_md5(finished_experiment["tmp"] / "data")
    curve = client.get_metric_history(parent.info.run_id, "accuracy")
    assert sorted(m.step for m in curve) == [40, 60]
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "accuracy_by_cycle")) == [0, 1]
    assert parent.data.tags["tidal.eval_split"] == "test"  # validation_size 0: the test split

    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["cycle"]))
    assert [r.data.tags["cycle"] for r in children] == ["0", "1"]
    for child, n_labeled in zip(children, (40, 60)):
        run_id = child.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.metrics["n_labeled"] == n_labeled
        assert 0 < child.data.metrics["accuracy"] <= 1
        for key in ("train_loss", "train_accuracy", "module_kl_loss"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
        kl = [m.value for m in client.get_metric_history(run_id, "module_kl_loss")]
        assert all(v > 0 for v in kl)  # the TD module was trained
        assert [a.path for a in client.list_artifacts(run_id, "query")] == ["query/query.csv"]
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/model.pt"]
        assert json.loads(child.data.tags["tidal.model_spec"]) == {
            "backbone": "small-cnn", "dropout": 0.0, "num_classes": 10, "in_shape": [1, 8, 8]}
    # One LoggedModel per cycle, named for it, with the cycle's test accuracy and labels linked to it,
    # predicting what the cycle's checkpoint predicts.
    import mlflow
    import torch

    from tidal import inputs, pipeline
    from tidal.config import load_params
    from tidal.train import normalize, to_float

    models = {m.source_run_id: m for m in client.search_logged_models(experiment_ids=[exp.experiment_id])}
    assert set(models) == {c.info.run_id for c in children}
    params = load_params(None, _overrides(finished_experiment["tmp"]))
    data = inputs.dataset_for(params)
    x = to_float(data.test_images[:16])
    for cycle, child in enumerate(children):
        model = models[child.info.run_id]
        assert model.name == f"cycle-{cycle}"
        linked = {m.key: m.value for m in model.metrics}
        assert linked == {"accuracy": child.data.metrics["accuracy"], "n_labeled": child.data.metrics["n_labeled"]}
        loaded = mlflow.pytorch.load_model(model.model_uri)
        ckpt = finished_experiment["tmp"] / f"runs/it-digits/cycles/{cycle}/model.pt"
        backbone, _ = pipeline.load_models(params, ckpt)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.eval()(x), backbone.eval()(normalize(x))[0])


def test_rerun_resumes_and_extends(finished_experiment):
    """Asking for one more cycle runs only that cycle, in the same MLflow parent run."""
    from flows.experiment import experiment
    from mlflow import MlflowClient

    tmp = finished_experiment["tmp"]
    before = json.loads((tmp / "runs/it-digits/state.json").read_text())
    history = experiment(params_path=None, overrides=_overrides(tmp, "cycles=3"))
    assert [h["cycle"] for h in history] == [0, 1, 2]
    assert history[:2] == before["history"]
    client = MlflowClient(tracking_uri=finished_experiment["uri"])
    exp = client.get_experiment_by_name("it-digits")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tidal.kind") == "experiment"]
    assert len(parents) == 1
    assert sorted(m.step for m in client.get_metric_history(parents[0].info.run_id, "accuracy")) == [40, 60, 80]


def test_tidal_run_resolves_the_params_once_and_the_train_step_runs_on_them(finished_experiment, monkeypatch,
                                                                            capsys):
    """`tidal run` resolves the experiment's params (its recorded overrides under the new --set)
    before any server starts; the flow, its tasks and the train step get exactly those, and
    nothing resolves them again."""
    import tidal.experiment
    import tidal.pipeline

    tmp = finished_experiment["tmp"]
    resolved, trained_on = [], []
    resolve, train_step = tidal.experiment.experiment_params, tidal.pipeline.train_step
    monkeypatch.setattr(tidal.experiment, "experiment_params",
                        lambda *a, **k: resolved.append(resolve(*a, **k)) or resolved[-1])
    monkeypatch.setattr(tidal.pipeline, "train_step",
                        lambda params, cycle: trained_on.append((params, cycle)) or train_step(params, cycle))
    # Only the name, where it lives and one more cycle: preset=debug and data_root come from the
    # overrides the experiment recorded.
    assert tidal_main(["run", "--set", "experiment=it-digits", "--set", f"runs_dir={tmp}/runs",
                       "--set", "cycles=3"]) == 0
    assert "finished in" in capsys.readouterr().out
    assert len(resolved) == 1
    params, overrides = resolved[0]
    assert params["preset"] == "debug" and params["data_root"] == f"{tmp}/data" and params["cycles"] == 3
    assert [cycle for _, cycle in trained_on] == [2] and trained_on[0][0] == params
    state = json.loads((tmp / "runs/it-digits/state.json").read_text())
    assert state["overrides"] == overrides and f"data_root={tmp}/data" in overrides and "cycles=3" in overrides
    assert [h["cycle"] for h in state["history"]] == [0, 1, 2]


def test_status_reports_the_workspace(finished_experiment, capsys):
    tmp = finished_experiment["tmp"]
    assert tidal_main(["status", *sum((["--set", o] for o in _overrides(tmp)), [])]) == 0
    out = capsys.readouterr().out
    last = finished_experiment["history"][-1]
    assert "cycle:        2 done of 2 planned" in out
    assert "labeled:      80" in out
    assert f"last test accuracy: {last['accuracy']:.4f}" in out
    assert "cycles/1/query.csv" in out
    # Lineage: each cycle's Prefect flow run, MLflow run and the DVC data version.
    state = json.loads((tmp / "runs/it-digits/state.json").read_text())
    for record in state["history"]:
        line = next(l for l in out.splitlines() if l.strip().startswith(f"{record['cycle']}  "))
        assert record["prefect_flow_run_id"] and record["prefect_flow_run_id"] in line
        assert record["mlflow_run_id"] and record["mlflow_run_id"] in line
        assert state["data_version"] in line


def test_changed_params_refuse_to_resume(finished_experiment, capsys):
    """Through the CLI, resuming with another strategy is a clear error and changes nothing."""
    tmp = finished_experiment["tmp"]
    state_before = (tmp / "runs/it-digits/state.json").read_bytes()
    code = tidal_main(["run", *sum((["--set", o] for o in _overrides(tmp, "strategy=entropy")), [])])
    assert code == 2
    err = capsys.readouterr().err
    assert "strategy='tidal-entropy'" in err and "--set experiment=NEW_NAME" in err
    assert (tmp / "runs/it-digits/state.json").read_bytes() == state_before


def test_compare_reports_strategies_from_mlflow(finished_experiment, capsys):
    """A second strategy in the same store: `tidal compare` plots both, tables AUBC and the gain."""
    from flows.experiment import experiment
    from mlflow import MlflowClient

    tmp = finished_experiment["tmp"]
    experiment(params_path=None, overrides=_overrides(tmp, "strategy=random", "experiment=it-digits-random"))
    assert tidal_main(["compare", "--out", str(tmp / "rep")]) == 0
    png, md = tmp / "rep/learning_curves.png", tmp / "rep/learning_curves.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = md.read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"random", "tidal-entropy"}
    tidal_row = [c.strip() for c in rows["tidal-entropy"].split("|")]
    accs = [float(h["accuracy"]) for h in finished_experiment["history"]]
    assert tidal_row[3:5] == [f"{a:.4f}" for a in accs]  # per-budget accuracy of the only seed
    assert tidal_row[5] == f"{sum(accs) / 2:.4f}"  # AUBC = mean over cycles, one seed: no interval
    assert tidal_row[6].startswith(("+", "-"))  # paired gain over random
    client = MlflowClient(tracking_uri=finished_experiment["uri"])
    # the flow logs the pool's own version, which compare needs equal across the runs it averages
    from tidal.config import load_params
    from tidal.experiment import load_state

    state = load_state(load_params(None, _overrides(tmp)))
    parent = client.get_run(state["tracking"]["parent_run_id"])
    assert parent.data.params["pool_version"] == str(state["pool_version"]) != ""
    comp = client.get_experiment_by_name("tidal-comparisons")
    run = client.search_runs([comp.experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "learning_curves.png", "learning_curves.md", "learning_curves.csv", "report.html"}


def _tracked_experiment(tracker, tmp: Path, accs: list[float], *overrides: str, pool_version: str = "") -> str:
    """A parent run in the real store with one curve point per cycle, as the flow logs them."""
    from tidal.config import load_params

    params = load_params(None, ["preset=debug", *overrides])
    parent = tracker.start_parent_run(params, data_version="md5-of-data", pool_version=pool_version)
    query = tmp / "query.csv"
    query.write_text("id,label\n")
    for cycle, acc in enumerate(accs):
        child = tracker.start_cycle(parent, params["experiment"], cycle, 40 + 20 * cycle)
        tracker.log_cycle_result(child, parent, cycle, 40 + 20 * cycle, acc, str(query))
    return parent


def test_compare_refuses_what_is_not_one_protocol_and_counts_a_restarted_experiment_once(
        mlflow_uri, tmp_path, capsys):
    """A second experiment beside the first: `tidal compare` must not average runs of another
    budget, nor two runs of one strategy and seed, and an experiment started over (its
    workspace deleted, its MLflow experiment kept) counts with its newest parent run only."""
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker(mlflow_uri)
    _tracked_experiment(tracker, tmp_path, [0.50, 0.60], "experiment=cmp-random", "strategy=random")
    _tracked_experiment(tracker, tmp_path, [0.10, 0.20], "experiment=cmp-entropy", "strategy=entropy")
    _tracked_experiment(tracker, tmp_path, [0.55, 0.70], "experiment=cmp-entropy", "strategy=entropy")  # started over
    assert tidal_main(["compare", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "left out 1 older parent run(s)" in out and "cmp-entropy/" in out
    entropy_row = [line for line in out.splitlines() if line.startswith("| entropy ")][0]
    assert [c.strip() for c in entropy_row.split("|")][2:5] == ["1", "0.5500", "0.7000"]
    assert "+0.0750" in entropy_row  # paired with random: (0.05 + 0.10) / 2

    _tracked_experiment(tracker, tmp_path, [0.5, 0.6], "experiment=cmp-margin", "strategy=margin", "budget=30")
    before = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert tidal_main(["compare", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "do not share one protocol" in err and "budget: 20 (cmp-entropy, cmp-random), 30 (cmp-margin)" in err
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == before
    assert tidal_main(["compare", "--experiment", "cmp-random", "--experiment", "cmp-entropy",
                       "--out", str(tmp_path / "rep")]) == 0
    assert tidal_main(["compare", "--experiment", "cmp-[re]*", "--out", str(tmp_path / "rep")]) == 0  # a pattern
    assert "| margin " not in capsys.readouterr().out
    assert tidal_main(["compare", "--experiment", "grid-*", "--out", str(tmp_path / "rep")]) == 2
    assert "no MLflow experiment named ['grid-*']" in capsys.readouterr().err

    _tracked_experiment(tracker, tmp_path, [0.5, 0.6], "experiment=cmp-random-again", "strategy=random")
    assert tidal_main(["compare", "--experiment", "cmp-random", "--experiment", "cmp-random-again",
                       "--out", str(tmp_path / "rep")]) == 2
    assert "strategy random seed 0 is in 2 experiments (cmp-random, cmp-random-again)" in capsys.readouterr().err

    # Two pools under one set of params (another imagefolder's content): refused by pool_version.
    _tracked_experiment(tracker, tmp_path, [0.5, 0.6], "experiment=cmp-pool-a", "strategy=random", "seed=1",
                        pool_version="md5-pool-a")
    _tracked_experiment(tracker, tmp_path, [0.5, 0.7], "experiment=cmp-pool-b", "strategy=entropy", "seed=1",
                        pool_version="md5-pool-b")
    assert tidal_main(["compare", "--experiment", "cmp-pool-*", "--out", str(tmp_path / "rep")]) == 2
    assert "pool_version: md5-pool-a (cmp-pool-a), md5-pool-b (cmp-pool-b)" in capsys.readouterr().err


def test_register_last_cycle_model_under_alias(finished_experiment, capsys):
    import mlflow
    import torch

    from tidal import inputs, pipeline
    from tidal.config import load_params
    from tidal.train import normalize, to_float

    tmp = finished_experiment["tmp"]
    assert tidal_main(["register", "--experiment", "it-digits", "--alias", "newest", "--pick", "last"]) == 0
    assert "models:/it-digits@newest" in capsys.readouterr().out
    model = mlflow.pytorch.load_model("models:/it-digits@newest")
    params = load_params(None, _overrides(tmp))
    backbone, _ = pipeline.load_models(params, tmp / "runs/it-digits/cycles/1/model.pt")
    data = inputs.dataset_for(params)
    x = to_float(data.test_images[:16])
    with torch.inference_mode():
        expected = backbone.eval()(normalize(x))[0]
        got = model.eval()(x)
    torch.testing.assert_close(got, expected)
    # The registered model is the last cycle's own LoggedModel; a second alias registers it again.
    assert tidal_main(["register", "--experiment", "it-digits", "--alias", "again", "--pick", "last"]) == 0
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("it-digits")
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    last = client.search_runs([exp.experiment_id], filter_string="tags.cycle = '1'")[0]
    assert sorted(m.name for m in models) == ["cycle-0", "cycle-1"]  # none made at registration
    version = client.get_model_version_by_alias("it-digits", "again")
    assert int(version.version) == 2 and version.run_id == last.info.run_id


def test_register_refuses_a_cycle_without_model_or_checkpoint(mlflow_uri):
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker()
    run_id = tracker.client.create_run(tracker._experiment_id("no-ckpt"), tags={"tidal.kind": "cycle", "cycle": "0"}
                                       ).info.run_id
    tracker.client.log_metric(run_id, "accuracy", 0.5)
    with pytest.raises(ValueError, match="neither a logged model nor a checkpoint"):
        tracker.register_cycle_model("no-ckpt", "no-ckpt", "champion")
    assert tracker.client.search_registered_models() == []  # nothing half-registered


def test_system_metrics_are_sampled_into_the_run(mlflow_uri):
    import time

    from mlflow import MlflowClient

    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker()
    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = tracker.client.create_run(tracker._experiment_id("sysmetrics")).info.run_id
    wanted = ("system/cpu_utilization", "system/system_memory_usage")

    def sampled() -> bool:
        keys = client.get_run(run_id).data.metrics
        return all(any(k.startswith(w) for k in keys) for w in wanted)

    with tracker.system_metrics(run_id, interval_s=0.5):
        deadline = time.monotonic() + 60  # the tracked work: wait until the sampler has logged both
        while not sampled() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert sampled(), client.get_run(run_id).data.metrics


def test_compare_finds_a_named_experiment_on_any_page_of_the_store(mlflow_uri, tmp_path, monkeypatch):
    """Stores with one experiment per grid cell run to thousands: experiments and their parent runs
    are read on every page."""
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker(mlflow_uri)
    for name in ("page-a", "page-b", "page-c"):
        _tracked_experiment(tracker, tmp_path, [0.5, 0.6], f"experiment={name}", "strategy=random",
                            f"seed={ord(name[-1])}")
    one_page = tracker.client.search_experiments
    monkeypatch.setattr(tracker.client, "search_experiments",
                        lambda max_results, page_token=None: one_page(max_results=2, page_token=page_token))
    runs_page = tracker.client.search_runs
    monkeypatch.setattr(tracker.client, "search_runs", lambda max_results, **kw: runs_page(max_results=1, **kw))
    rows, _ = tracker.learning_curves(["page-*"])
    assert sorted({r["experiment"] for r in rows}) == ["page-a", "page-b", "page-c"]


def test_input_errors_are_not_retried_but_other_failures_are(prefect_harness):
    """A DataError fails the same way every time: retrying it only delays the one clear message."""
    from prefect import flow, task

    from flows.experiment import OUTSIDE
    from tidal.data.errors import DataError

    calls = {"data": 0, "io": 0}

    @task(**{**OUTSIDE, "retry_delay_seconds": 0})
    def bad_input() -> None:
        calls["data"] += 1
        raise DataError("the images have 2 different sizes")

    @task(**{**OUTSIDE, "retry_delay_seconds": 0})
    def flaky_disk() -> None:
        calls["io"] += 1
        raise OSError("disk busy")

    @flow
    def both() -> None:
        for step in (bad_input, flaky_disk):
            try:
                step()
            except (DataError, OSError):
                pass

    both()
    assert calls == {"data": 1, "io": 1 + OUTSIDE["retries"]}
