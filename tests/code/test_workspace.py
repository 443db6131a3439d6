"""tidal.workspace atomic files, and the workspace state transitions in tidal.pipeline."""
from __future__ import annotations

from pathlib import Path

import csv
import os

import pytest

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.experiment import ExperimentMismatch, start_experiment
from tidal.workspace import (LEARNING_CURVE_COLUMNS, Workspace, atomic_write_bytes, atomic_write_text,
                             neutralize_cell, read_csv, read_json, restore_cell, workspace, write_csv, write_json)


# --- atomic files ---------------------------------------------------------------------------

def test_atomic_write_replaces_contents_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first version, rather long\n")
    assert target.read_text() == "first version, rather long\n"
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"  # replaced, not appended or partially overwritten
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_failed_atomic_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_json_and_csv_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2.5, None], "y": "z"})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2.5, None], "y": "z"}
    write_csv(tmp_path / "b.csv", ["id", "score"], [{"id": "s-1", "score": 0.5}, {"id": "s-2", "score": 1}])
    assert read_csv(tmp_path / "b.csv") == [{"id": "s-1", "score": "0.5"}, {"id": "s-2", "score": "1"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv"]


def test_workspace_paths_and_missing_state(tmp_path):
    ws = Workspace(tmp_path / "runs", "exp")
    assert ws.state_path == tmp_path / "runs" / "exp" / "state.json"
    assert ws.cycle_dir(3) == tmp_path / "runs" / "exp" / "cycles" / "3"
    assert not ws.exists()
    with pytest.raises(FileNotFoundError):
        ws.load_state()


# --- experiment state ------------------------------------------------------------------------

@pytest.fixture
def params(tmp_path, data_root):
    return load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={data_root}",
                              "device=cpu", "strategy=entropy"])


DATA_VERSION = "v-test"


def _read_curve(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_start_experiment_creates_state_and_empty_curve(params):
    state = start_experiment(params, DATA_VERSION)
    ws = workspace(params)
    assert ws.exists()
    assert state["cycle"] == 0
    assert len(state["labeled"]) == params["initial_size"]
    assert read_json(ws.state_path) == state
    columns, rows = _read_curve(ws.learning_curve_path)
    assert columns == LEARNING_CURVE_COLUMNS == ["strategy", "seed", "cycle", "n_labeled", "accuracy"]
    assert rows == []


def test_start_experiment_initial_set_depends_on_seed_not_strategy(tmp_path, data_root):
    def initial(strategy, seed):
        p = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/{strategy}-{seed}",
                               f"data_root={data_root}", f"strategy={strategy}", f"seed={seed}"])
        return start_experiment(p, DATA_VERSION)["labeled"]

    assert initial("entropy", 0) == initial("random", 0)
    assert initial("entropy", 0) != initial("entropy", 1)


def _unlabeled(params, state, n):
    data = inputs.dataset_for(params)
    ids = [i for i in data.pool_ids if i not in state["labeled"]][:n]
    return dict(zip(ids, data.pool_labels[data.index_of(ids)].tolist()))


def test_commit_cycle_updates_state_and_learning_curve(params):
    state = start_experiment(params, DATA_VERSION)
    ws = workspace(params)
    n0 = len(state["labeled"])
    new = _unlabeled(params, state, params["budget"])
    record = pipeline.commit_cycle(params, 0, 0.8125, "cycles/0/query.csv", new)
    assert record["cycle"] == 0 and record["n_labeled"] == n0 and record["n_queried"] == len(new)

    state = ws.load_state()
    assert state["cycle"] == 1
    assert len(state["labeled"]) == n0 + len(new)
    assert all(state["labeled"][i] == y for i, y in new.items())
    assert state["history"][-1]["accuracy"] == 0.8125

    new2 = _unlabeled(params, state, params["budget"])
    pipeline.commit_cycle(params, 1, 0.875, "cycles/1/query.csv", new2)
    columns, rows = _read_curve(ws.learning_curve_path)
    assert columns == ["strategy", "seed", "cycle", "n_labeled", "accuracy"]
    assert [r["strategy"] for r in rows] == ["entropy", "entropy"]
    assert [r["seed"] for r in rows] == [str(params["seed"])] * 2
    assert [int(r["cycle"]) for r in rows] == [0, 1]
    assert [int(r["n_labeled"]) for r in rows] == [n0, n0 + len(new)]
    assert [float(r["accuracy"]) for r in rows] == [0.8125, 0.875]
    metrics = read_json(ws.metrics_path)
    assert metrics["cycles_done"] == 2
    assert metrics["final_accuracy"] == 0.875 and metrics["split"] == "test"
    assert metrics["aubc"] == pytest.approx((0.8125 + 0.875) / 2)
    assert [p.name for p in ws.root.iterdir() if p.name.endswith(".tmp")] == []


def test_commit_cycle_rejects_wrong_cycle_and_relabeling(params):
    state = start_experiment(params, DATA_VERSION)
    ws = workspace(params)
    before = ws.state_path.read_bytes()
    with pytest.raises(RuntimeError, match="cycle"):
        pipeline.commit_cycle(params, 1, 0.5, "q.csv", _unlabeled(params, state, 3))
    already = next(iter(state["labeled"]))
    with pytest.raises(ValueError, match="already labeled"):
        pipeline.commit_cycle(params, 0, 0.5, "q.csv", {already: state["labeled"][already]})
    assert ws.state_path.read_bytes() == before


@pytest.mark.parametrize("override, key", [("strategy=random", "strategy"), ("seed=3", "seed"),
                                           ("train.lr=0.01", "train.lr")])
def test_changed_params_raise_mismatch_and_leave_state_untouched(params, override, key):
    start_experiment(params, DATA_VERSION)
    ws = workspace(params)
    before = ws.state_path.read_bytes()
    curve_before = ws.learning_curve_path.read_bytes()
    changed = load_params(None, ["preset=debug", f"runs_dir={params['runs_dir']}",
                                 f"data_root={params['data_root']}", "device=cpu", "strategy=entropy",
                                 override])
    with pytest.raises(ExperimentMismatch) as err:
        start_experiment(changed, DATA_VERSION)
    assert f"{key}=" in str(err.value)  # names the key with its old and new values
    assert ws.state_path.read_bytes() == before
    assert ws.learning_curve_path.read_bytes() == curve_before


def test_resumable_keys_may_change(params):
    first = start_experiment(params, DATA_VERSION)
    more_cycles = dict(params, cycles=params["cycles"] + 3, score_batch_size=7)
    assert start_experiment(more_cycles, DATA_VERSION) == first


def test_changed_data_version_is_refused(tmp_path, data_root):
    import shutil

    from tidal.data import DataError

    # A private copy of the data: this test damages it.
    shutil.copytree(data_root, tmp_path / "data")
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={tmp_path}/data",
                                "device=cpu", "strategy=entropy"])
    start_experiment(params, DATA_VERSION)
    before = workspace(params).state_path.read_bytes()
    # The pool itself changed on disk (a file of the data set was replaced).
    images = Path(params["data_root"]) / "digits" / "images.npy"
    images.write_bytes(images.read_bytes() + b"\0")
    with pytest.raises(DataError, match="pool data .* changed since experiment"):
        start_experiment(params, "another-version")
    assert workspace(params).state_path.read_bytes() == before


# --- spreadsheet formulas in CSV cells, file modes (issue #31, items 5 and 6) -------------------

CELLS = ["-1", "=1+17", "@SUM(1+1)", "+1", "-", "=", "\t=x", "\r=x", "'=x", "''=x", "'-1", "'", "''", "'abc",
         "abc", "", "a=b", "-0.5", "+3e-4", "-2+3+cmd|' /C calc'!A0", "=HYPERLINK(\"http://x\")", "@", "\t", "\r"]


@pytest.mark.parametrize("value", CELLS)
def test_cell_rule_round_trips_and_no_cell_starts_a_formula(value):
    written = neutralize_cell(value)
    assert restore_cell(written) == value
    if value[:1] in ("=", "+", "-", "@", "\t", "\r") and not _plain_number(value):
        assert written == "'" + value
    assert written[:1] not in ("=", "+", "-", "@", "\t", "\r") or _plain_number(written)


def _plain_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


def test_write_csv_neutralizes_formulas_and_read_csv_restores_them(tmp_path):
    rows = [{"id": value, "score": i - 3.5} for i, value in enumerate(CELLS)]
    write_csv(tmp_path / "scores.csv", ["id", "score"], rows)
    with open(tmp_path / "scores.csv", newline="") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    # what a spreadsheet sees: no formula, and plain numbers stay numbers (DVC plots, pandas)
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r") and not _plain_number(c)]
    assert "-3.5" in cells and "'=1+17" in cells
    assert read_csv(tmp_path / "scores.csv") == [{"id": r["id"], "score": str(r["score"])} for r in rows]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """mkstemp makes its file 0600: annotators under other accounts could not read the query."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "query.csv", "id\n")
        write_json(tmp_path / "state.json", {})
        atomic_write_bytes(tmp_path / "images" / "00001.png", b"\x89PNG")
    finally:
        os.umask(old)
    for path in (tmp_path / "query.csv", tmp_path / "state.json", tmp_path / "images" / "00001.png"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_rewriting_a_file_takes_the_umask_again(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)
    old = os.umask(0o022)
    try:
        write_json(target, {"a": 1})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_secret_is_written_with_its_own_mode_from_the_first_byte(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # the temporary file, complete, just before it takes the name
        seen.append(os.stat(src).st_mode & 0o777)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "webhook.secret", "s3cret\n", mode=0o600)
    finally:
        os.umask(old)
    assert seen == [0o600] and (tmp_path / "webhook.secret").stat().st_mode & 0o777 == 0o600


def test_the_lock_waits_for_a_live_owner_up_to_its_wait_time(tmp_path):
    """labels-arrived waits for a running cycle of its experiment (ExperimentLock's wait_s)
    instead of failing at once; with no wait the second opener is refused at once."""
    import json
    import socket
    import subprocess
    import threading
    import time

    from tidal.workspace import ExperimentLock, ExperimentLocked

    owner = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        lock_file = tmp_path / ".lock"
        lock_file.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "now"}))
        began = time.monotonic()
        with pytest.raises(ExperimentLocked, match=f"pid {owner.pid}"):
            ExperimentLock(tmp_path).__enter__()
        assert time.monotonic() - began < 1.0

        threading.Timer(1.0, lock_file.unlink).start()  # the owner finishes after a second
        with ExperimentLock(tmp_path, wait_s=30) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert not lock_file.exists()

        lock_file.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "now"}))
        began = time.monotonic()
        with pytest.raises(ExperimentLocked):
            ExperimentLock(tmp_path, wait_s=3).__enter__()  # it never finishes: refused after the wait
        assert 2.0 <= time.monotonic() - began < 10.0
    finally:
        owner.kill()
        owner.wait()


def test_the_lock_is_entered_again_by_its_holding_thread_only(tmp_path):
    """`tidal run` enters its own lock again through the flow; another thread of the same process
    (a second flow run in it) is refused like another process, and sees the hold's token."""
    import threading

    from tidal.workspace import ExperimentLock, ExperimentLocked

    seen = {}

    def other_thread() -> None:
        seen["token"] = ExperimentLock.holding(tmp_path)
        try:
            ExperimentLock(tmp_path).__enter__()
            seen["entered"] = True
        except ExperimentLocked:
            seen["entered"] = False

    with ExperimentLock(tmp_path):
        token = ExperimentLock.holding(tmp_path)
        with ExperimentLock(tmp_path):  # the same thread: entered again
            assert ExperimentLock.holding(tmp_path) is token
        assert (tmp_path / ".lock").exists()  # the inner exit keeps the lock
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen == {"token": token, "entered": False}
    assert not (tmp_path / ".lock").exists() and ExperimentLock.holding(tmp_path) is None
    with ExperimentLock(tmp_path):
        assert ExperimentLock.holding(tmp_path) is not token  # taken afresh: a new token
