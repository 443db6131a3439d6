"""A study: the experiments of a grid in one MLflow experiment (params key `study`), so the MLflow
UI compares their runs on one page; `tidal compare` and `tidal register` still tell the
experiments apart. A real MLflow sqlite store; the runs logged as the flow logs them."""
from __future__ import annotations

from pathlib import Path

import pytest

from tidal.cli import main as tidal_main
from tidal.config import ConfigError, load_params


def _tracked(tracker, tmp: Path, accs: list[float], *overrides: str) -> tuple[str, list[str]]:
    """A parent run with one cycle run per accuracy, as the flow logs them; its id and the cycles'."""
    params = load_params(None, ["preset=debug", *overrides])
    parent = tracker.start_parent_run(params, data_version="md5-of-data", pool_version="md5-pool")
    query = tmp / "query.csv"
    query.write_text("id,label\n")
    children = []
    for cycle, acc in enumerate(accs):
        child = tracker.start_cycle(parent, params["experiment"], cycle, 40 + 20 * cycle)
        tracker.log_cycle_result(child, parent, cycle, 40 + 20 * cycle, acc, str(query))
        children.append(child)
    return parent, children


def test_a_grid_in_one_study_is_one_mlflow_experiment_and_compare_and_register_tell_them_apart(
        mlflow_uri, tmp_path, capsys):
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker(mlflow_uri)
    cells = {("random", 0): [0.50, 0.60], ("entropy", 0): [0.55, 0.70],
             ("random", 1): [0.52, 0.58], ("entropy", 1): [0.50, 0.66]}
    runs = {cell: _tracked(tracker, tmp_path, accs, "study=grid", f"experiment=grid-{cell[0]}-s{cell[1]}",
                           f"strategy={cell[0]}", f"seed={cell[1]}") for cell, accs in cells.items()}
    # one MLflow experiment, named after the study, holds every parent run, named strategy-seed
    names = sorted(e.name for e in tracker.client.search_experiments())
    assert "grid" in names and not [n for n in names if n.startswith("grid-")]
    grid = tracker.client.get_experiment_by_name("grid")
    parents = tracker.client.search_runs([grid.experiment_id], filter_string="tags.`tidal.kind` = 'experiment'")
    assert sorted(r.info.run_name for r in parents) == ["entropy-seed0", "entropy-seed1", "random-seed0", "random-seed1"]
    assert sorted(r.data.tags["tidal.experiment"] for r in parents) == [
        "grid-entropy-s0", "grid-entropy-s1", "grid-random-s0", "grid-random-s1"]

    # compare reads the study and keeps the four experiments apart (four seeds-strategy cells, no
    # run counted as an older run of another)
    rows, superseded = tracker.learning_curves(["grid"])
    assert superseded == [] and len(rows) == 8
    assert {r["experiment"] for r in rows} == {"grid-random-s0", "grid-entropy-s0", "grid-random-s1", "grid-entropy-s1"}
    assert tidal_main(["compare", "--experiment", "grid", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    entropy_row = [line for line in out.splitlines() if line.startswith("| entropy ")][0]
    assert [c.strip() for c in entropy_row.split("|")][2] == "2"  # two seeds

    # register picks the named experiment's best cycle inside the study (here: it has no model,
    # so the error names that cycle's run: the entropy seed-1 experiment's cycle 1, not another's)
    with pytest.raises(ValueError, match=f"cycle run {runs[('entropy', 1)][1][1]} has neither"):
        tracker.register_cycle_model("grid-entropy-s1", "grid-entropy-s1", "champion")
    with pytest.raises(ValueError, match="no MLflow experiment named 'grid-missing'"):
        tracker.register_cycle_model("grid-missing", "grid-missing", "champion")


def test_without_a_study_each_experiment_is_its_own_mlflow_experiment(mlflow_uri, tmp_path):
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker(mlflow_uri)
    _tracked(tracker, tmp_path, [0.5], "experiment=alone", "strategy=random")
    assert tracker.client.get_experiment_by_name("alone") is not None


def test_a_study_name_follows_the_name_rule():
    with pytest.raises(ConfigError, match="study"):
        load_params(None, ["study=../x"])
    assert load_params(None, ["study=grid-1"])["study"] == "grid-1"
