"""Real annotators in the loop: human mode through the real Prefect flow and MLflow store,
partial imports, bad input that changes nothing, the experiment lock, label history."""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.cli import main as tidal_main
from tidal.data.sources import load_dataset


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return ["preset=debug", "label_mode=human", "experiment=human-digits", f"runs_dir={tmp}/runs",
            f"data_root={tmp}/data", *extra]


def _sets(tmp: Path, *extra: str) -> list[str]:
    return sum((["--set", o] for o in _overrides(tmp, *extra)), [])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_annotated(src: Path, dest: Path, labels: dict[str, str], annotator: str = "ann") -> Path:
    rows = _rows(src)
    for r in rows:
        r["label"] = labels.get(r["id"], "")
        r["annotator"] = annotator
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def _snapshot(tmp: Path) -> dict[str, bytes]:
    """Every saved file of the experiment and its data, by path."""
    return {str(p.relative_to(tmp)): p.read_bytes()
            for base in (tmp / "runs", tmp / "data") for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture
def waiting_experiment(prefect_harness, mlflow_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tidal_main(["run", *_sets(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = load_dataset(tmp_path / "data", "digits")
    truth = {i: data.classes[y] for i, y in zip(data.pool_ids, data.pool_labels.tolist())}
    return {"tmp": tmp_path, "out": out, "truth": truth, "uri": mlflow_uri,
            "ws": tmp_path / "runs/human-digits"}


def test_human_cycle_exports_and_waits(waiting_experiment, capsys):
    tmp, ws = waiting_experiment["tmp"], waiting_experiment["ws"]
    assert "WAITING FOR LABELS: query human-digits-cycle0 (20 samples pending)" in waiting_experiment["out"]
    query = _rows(ws / "cycles/0/query.csv")
    assert list(query[0])[:8] == ["experiment", "cycle", "query_id", "id", "path", "score", "rank",
                                  "suggested_label"]
    assert {r["experiment"] for r in query} == {"human-digits"} and len(query) == 20
    assert all(r["suggested_label"] in [str(d) for d in range(10)] for r in query)
    jsonl = [json.loads(line) for line in (ws / "cycles/0/query.jsonl").read_text().splitlines()]
    assert [j["id"] for j in jsonl] == [r["id"] for r in query]
    tasks = json.loads((ws / "cycles/0/query_labelstudio.json").read_text())
    assert tasks[0]["data"]["query_id"] == "human-digits-cycle0"
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [query[0]["suggested_label"]]
    # Running again before any label came back does not start another cycle.
    before = (ws / "state.json").read_bytes()
    assert tidal_main(["run", *_sets(tmp)]) == 0
    assert (ws / "state.json").read_bytes() == before
    assert tidal_main(["status", *_sets(tmp)]) == 0
    status = capsys.readouterr().out
    assert "WAITING FOR LABELS" in status and "cycles/0/query.csv" in status


def test_partial_import_then_next_cycle(waiting_experiment, capsys):
    from mlflow import MlflowClient

    tmp, ws, truth = waiting_experiment["tmp"], waiting_experiment["ws"], waiting_experiment["truth"]
    query = [r["id"] for r in _rows(ws / "cycles/0/query.csv")]
    done = query[:12]
    annotated = _write_annotated(ws / "cycles/0/query.csv", tmp / "back.csv", {i: truth[i] for i in done})
    assert tidal_main(["import-labels", str(annotated), *_sets(tmp)]) == 0
    assert "imported 12 new label(s)" in capsys.readouterr().out
    state = json.loads((ws / "state.json").read_text())
    assert set(state["pending"]) == set(query[12:])
    assert all(state["labeled"][i] == int(truth[i]) for i in done)
    log = _rows(tmp / "data/labels/human-digits.csv")
    assert [r["id"] for r in log] == done and {r["annotator"] for r in log} == {"ann"}
    assert {r["query_id"] for r in log} == {"human-digits-cycle0"}
    # MLflow follows the new data version.
    client = MlflowClient(tracking_uri=waiting_experiment["uri"])
    parent = client.get_run(state["tracking"]["parent_run_id"])
    assert parent.data.tags["data_version"] == state["data_version"]
    assert parent.data.tags["data_version.1"] == state["data_version"]
    # The next run trains on 40 + 12 labels and never re-selects the 8 still pending.
    assert tidal_main(["run", *_sets(tmp)]) == 0
    state = json.loads((ws / "state.json").read_text())
    assert state["history"][1]["n_labeled"] == 52
    second = [r["id"] for r in _rows(ws / "cycles/1/query.csv")]
    assert not set(second) & set(query)
    assert len(state["pending"]) == 8 + 20
    child = client.get_run(state["history"][1]["mlflow_run_id"])
    assert child.data.tags["data_version"] == state["data_version"]


BAD_CASES = {
    "unknown id": ({"digits-99999": "3"}, [], "not in the experiment's pool"),
    "not pending": ({"__unqueried__": "3"}, [], "--force"),
    "label not a class": ({"__pending__": "seven"}, [], "seven"),
    "other experiment": ({"__pending__": "1"}, ["--experiment-column", "other-exp"], "another experiment"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_import_changes_nothing(waiting_experiment, capsys, case):
    tmp, ws, truth = waiting_experiment["tmp"], waiting_experiment["ws"], waiting_experiment["truth"]
    labels, flags, message = BAD_CASES[case]
    state = json.loads((ws / "state.json").read_text())
    pending_id = sorted(state["pending"])[0]
    unqueried = next(i for i in sorted(truth) if i not in state["pending"] and i not in state["labeled"])
    rows = _rows(ws / "cycles/0/query.csv")
    label = next(iter(labels.values()))
    key = next(iter(labels))
    target = {"__pending__": pending_id, "__unqueried__": unqueried}.get(key, key)
    row = dict(rows[0], id=target, label=label)
    if flags[:1] == ["--experiment-column"]:
        row["experiment"] = flags[1]
    path = tmp / "bad.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    before = _snapshot(tmp)
    assert tidal_main(["import-labels", str(path), *_sets(tmp)]) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(tmp) == before
    if case == "not pending":  # an id nobody asked for is accepted on purpose with --force
        row["label"] = truth[unqueried]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        assert tidal_main(["import-labels", str(path), "--force", *_sets(tmp)]) == 0
        state = json.loads((ws / "state.json").read_text())
        assert state["labeled"][unqueried] == int(truth[unqueried])


def test_conflicting_relabel_needs_flag_and_keeps_history(waiting_experiment, capsys):
    tmp, ws, truth = waiting_experiment["tmp"], waiting_experiment["ws"], waiting_experiment["truth"]
    first = _rows(ws / "cycles/0/query.csv")[0]["id"]
    right, wrong = truth[first], str((int(truth[first]) + 1) % 10)
    assert tidal_main(["import-labels", str(_write_annotated(ws / "cycles/0/query.csv", tmp / "a.csv",
                                                              {first: wrong}, "alice")), *_sets(tmp)]) == 0
    fix = _write_annotated(ws / "cycles/0/query.csv", tmp / "b.csv", {first: right}, "bob")
    before = _snapshot(tmp)
    assert tidal_main(["import-labels", str(fix), *_sets(tmp)]) == 2
    assert "--relabel" in capsys.readouterr().err
    assert _snapshot(tmp) == before  # first label kept
    assert tidal_main(["import-labels", str(fix), "--relabel", *_sets(tmp)]) == 0
    state = json.loads((ws / "state.json").read_text())
    assert state["labeled"][first] == int(right)
    capsys.readouterr()
    assert tidal_main(["status", "--history", first, *_sets(tmp)]) == 0
    history = capsys.readouterr().out
    assert history.index(f"{wrong}  by alice") < history.index(f"{right}  by bob")
    assert f"supersedes {wrong}" in history


def test_second_run_refuses_while_locked_and_stale_lock_is_taken_over(waiting_experiment, capsys):
    tmp, ws = waiting_experiment["tmp"], waiting_experiment["ws"]
    holder = subprocess.Popen(  # another process runs the experiment
        [sys.executable, "-c", "import sys, time\nfrom tidal.workspace import ExperimentLock\n"
         "with ExperimentLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)", str(ws)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert tidal_main(["run", *_sets(tmp)]) == 2
        err = capsys.readouterr().err
        assert f"is being run by pid {holder.pid}" in err and ".lock" in err
    finally:
        holder.kill()
        holder.wait()
    # A lock left by a killed process (its pid no longer exists) does not block.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ws / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert tidal_main(["run", *_sets(tmp)]) == 0
    assert not (ws / ".lock").exists()


def test_a_run_walks_the_data_once_and_again_only_after_it_can_have_changed(waiting_experiment, monkeypatch):
    """`tidal run` checks the data before Prefect starts and holds the experiment's lock through
    the flow, which reads that check instead of walking every file again. Under a hold of the
    lock, a label import (files under labels/, a new pin) or letting go of the lock means a new
    walk."""
    import tidal.experiment as experiment_mod
    from tidal.workspace import ExperimentLock

    tmp, ws = waiting_experiment["tmp"], waiting_experiment["ws"]
    walks = []
    real = experiment_mod.verify_data_version
    monkeypatch.setattr(experiment_mod, "verify_data_version", lambda root: walks.append(root) or real(root))
    assert tidal_main(["run", *_sets(tmp)]) == 0
    assert len(walks) == 1
    params = experiment_mod.experiment_params(None, _overrides(tmp))[0]
    with ExperimentLock(ws):
        first = experiment_mod.prepare_data(params)
        assert experiment_mod.prepare_data(params) == first and len(walks) == 2
        (tmp / "data" / "labels").mkdir(exist_ok=True)
        (tmp / "data" / "labels" / "other.csv").write_text("id,label\n")  # another experiment's import
        assert experiment_mod.prepare_data(params)["dir_version"] != first["dir_version"] and len(walks) == 3
    with ExperimentLock(ws):  # a new hold: the data may have changed while nobody held the lock
        experiment_mod.prepare_data(params)
        assert len(walks) == 4


@pytest.mark.parametrize("initial_size, message", [
    (1430, "budget=20 is larger than the 8 unlabeled samples left"),  # the pool holds 1,438
    (1438, "no unlabeled samples are left"),
])
def test_too_few_unlabeled_samples_is_an_error(tmp_path, initial_size, message):
    from tidal import pipeline
    from tidal.config import load_params
    from tidal.data.errors import DataError
    from tidal.experiment import prepare_data, start_experiment

    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={tmp_path}/data",
                                f"initial_size={initial_size}", "budget=20", "tracking=false", "train.epochs=1"])
    info = prepare_data(params)
    start_experiment(params, info["data_version"], info["pool_version"])
    trained = pipeline.train_step(params, 0)
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match=message):
        pipeline.score_step(params, 0, trained["checkpoint"])
    assert _snapshot(tmp_path) == before


def test_commands_on_an_experiment_use_its_recorded_settings(prefect_harness, mlflow_uri, tmp_path, monkeypatch,
                                                             capsys):
    """Started with `--set data_root=ELSEWHERE` (and other --set values), the experiment's later
    commands name only the experiment: import-labels writes the labels log under ELSEWHERE,
    status shows the recorded cycle count and next steps that work as printed."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    started = ["--set", "preset=debug", "--set", "label_mode=human", "--set", "experiment=rec",
               "--set", f"data_root={elsewhere}", "--set", "cycles=3"]
    assert tidal_main(["run", *started]) == 0
    out = capsys.readouterr().out
    assert "then:      tidal import-labels FILE --experiment rec\n" in out
    assert "and:       tidal run --set experiment=rec " in out
    ws = tmp_path / "runs/rec"
    data = load_dataset(elsewhere, "digits")
    truth = {i: data.classes[y] for i, y in zip(data.pool_ids, data.pool_labels.tolist())}
    back = _write_annotated(ws / "cycles/0/query.csv", tmp_path / "back.csv", truth)
    assert tidal_main(["import-labels", str(back), "--experiment", "rec"]) == 0  # as status printed it
    assert (elsewhere / "labels/rec.csv").is_file()
    assert not (tmp_path / "data").exists()  # nothing written under ./params.yaml's data_root
    assert tidal_main(["status", "--experiment", "rec"]) == 0
    assert "cycle:        1 done of 3 planned" in capsys.readouterr().out
    some_id = _rows(ws / "cycles/0/query.csv")[0]["id"]
    assert tidal_main(["status", "--experiment", "rec", "--history", some_id]) == 0
    assert " by ann at " in capsys.readouterr().out  # the human label, not "from the data set"
    # a --set that would change what defines the experiment is refused, and changes nothing
    before = _snapshot(tmp_path / "elsewhere/..")
    assert tidal_main(["run", "--set", "experiment=rec", "--set", "train.epochs=9"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert _snapshot(tmp_path / "elsewhere/..") == before
    assert tidal_main(["run", "--set", "experiment=rec"]) == 0  # resumes on the recorded settings
    assert (ws / "cycles/1/query.csv").is_file()


def test_a_failed_start_leaves_no_workspace_and_status_into_a_closed_pipe_is_quiet(prefect_harness, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tidal_main(["run", "--set", "dataset=imagefolder", "--set", f"data_root={tmp_path}/none",
                       "--set", "experiment=nothing"]) == 2
    assert not (tmp_path / "runs/nothing").exists()
    assert tidal_main(["run", "--set", "preset=debug", "--set", "tracking=false", "--set", "experiment=piped",
                       "--set", "cycles=1"]) == 0
    # `true` exits without reading: every write of status meets a closed pipe (as `| head` does
    # once head has its lines).
    status = f"{sys.executable} -m tidal.cli status --experiment piped"
    done = subprocess.run(f"{status} 2>err.txt | true", shell=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_disagreeing_annotators_are_refused_by_name_and_stay_pending(waiting_experiment, capsys):
    """Two Label Studio annotators disagree on one task: by default (label_conflicts=refuse) that
    id is not imported and is named; the agreed ones are, with the decision in the log."""
    tmp, ws = waiting_experiment["tmp"], waiting_experiment["ws"]
    tasks = json.loads((ws / "cycles/0/query_labelstudio.json").read_text())[:2]

    def answer(choice: str, user: int) -> dict:
        return {"id": user, "completed_by": user, "was_cancelled": False, "updated_at": f"2026-01-0{user}T10:00:00Z",
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [choice]}}]}

    tasks[0]["annotations"] = [answer("3", 1), answer("5", 2)]  # disagree
    tasks[1]["annotations"] = [answer("4", 1), answer("4", 2)]  # agree
    export = tmp / "ls-export.json"
    export.write_text(json.dumps(tasks))
    assert tidal_main(["import-labels", str(export), *_sets(tmp)]) == 0
    out = capsys.readouterr().out
    disputed, agreed = tasks[0]["data"]["sample_id"], tasks[1]["data"]["sample_id"]
    assert "imported 1 new label(s)" in out and disputed in out and "label_conflicts=refuse" in out
    state = json.loads((ws / "state.json").read_text())
    assert disputed in state["pending"] and disputed not in state["labeled"]
    assert state["labeled"][agreed] == 4
    log = _rows(tmp / "data/labels/human-digits.csv")
    assert [r["id"] for r in log] == [agreed] and log[0]["decided_by"] == "unanimous"
    assert state["imports"][-1]["conflicts_refused"] == [disputed]


def test_a_labels_file_from_the_inbox_runs_the_next_cycle_once(waiting_experiment):
    """The labels-arrived flow as the inbox event starts it (`file` set): each file is imported
    through import-labels' rules; the next cycle runs once the files so far answer
    `labelstudio.min_new` of the query, and the same event again runs none."""
    from flows.experiment import labels_arrived

    tmp, ws, truth = waiting_experiment["tmp"], waiting_experiment["ws"], waiting_experiment["truth"]
    query = [r["id"] for r in _rows(ws / "cycles/0/query.csv")]
    (tmp / "inbox/human-digits").mkdir(parents=True)
    overrides = _overrides(tmp, "labelstudio.min_new=5")
    early = _write_annotated(ws / "cycles/0/query.csv", tmp / "inbox/human-digits/first.csv",
                             {i: truth[i] for i in query[:3]})
    first = labels_arrived("human-digits", None, overrides, file=str(early))
    assert first["cycle"] is None and (first["answered"], first["needed"]) == (3, 5)  # saved, no cycle yet
    state = json.loads((ws / "state.json").read_text())
    assert set(query[:3]) <= set(state["labeled"]) and len(state["history"]) == 1
    dropped = _write_annotated(ws / "cycles/0/query.csv", tmp / "inbox/human-digits/back.csv",
                               {i: truth[i] for i in query[3:5]})
    second = labels_arrived("human-digits", None, overrides, file=str(dropped))
    assert second["cycle"] == 1
    state = json.loads((ws / "state.json").read_text())
    assert [h["n_labeled"] for h in state["history"]] == [40, 45]
    assert set(query[:5]) <= set(state["labeled"])
    again = labels_arrived("human-digits", None, overrides, file=str(dropped))
    assert again["cycle"] is None  # nothing new: the new query waits, no second cycle
    assert len(json.loads((ws / "state.json").read_text())["history"]) == 2