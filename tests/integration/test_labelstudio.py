"""Annotators in a real Label Studio (started here, on 127.0.0.1): a human-mode cycle pushes its
query as tasks, annotations made through Label Studio's API come back through `tidal labelstudio
pull` (the rules of import-labels), and the next cycle trains on exactly those labels."""
from __future__ import annotations

import csv
import json
import urllib.request
from pathlib import Path

import pytest

from tests.integration.servers import free_port, http_json, label_studio
from tidal.cli import main as tidal_main
from tidal.data.sources import load_dataset

TOKEN = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, Label Studio's legacy token form


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory):
    """One Label Studio for the module; it serves local files from under pytest's base folder,
    where every test's tmp_path lies."""
    root = tmp_path_factory.getbasetemp()
    with label_studio(tmp_path_factory.mktemp("label-studio") / "data", root, TOKEN) as server:
        yield {**server, "document_root": root}


def api(studio: dict, path: str, method: str = "GET", body=None):
    req = urllib.request.Request(studio["url"] + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def tasks_of(studio: dict, project_id: int) -> list[dict]:
    return api(studio, f"/api/projects/{project_id}/export?exportType=JSON&download_all_tasks=true")


def annotate(studio: dict, task_id: int, label: str | None, user_id: int | None = None) -> None:
    """What an annotator's submit (or skip, label None) does in Label Studio's UI."""
    body = ({"result": [], "was_cancelled": True} if label is None else
            {"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                         "value": {"choices": [label]}}]})
    if user_id is not None:
        body["completed_by"] = user_id
    api(studio, f"/api/tasks/{task_id}/annotations", "POST", body)


def sets(tmp: Path, experiment: str, *extra: str) -> list[str]:
    keys = ["preset=debug", "label_mode=human", f"experiment={experiment}", f"runs_dir={tmp}/runs",
            f"data_root={tmp}/data", *extra]
    return sum((["--set", k] for k in keys), [])


def state(tmp: Path, experiment: str) -> dict:
    return json.loads((tmp / "runs" / experiment / "state.json").read_text())


def connect(studio: dict, tmp: Path, experiment: str, url: str | None = None) -> int:
    return tidal_main(["labelstudio", "connect", "--url", url or studio["url"], "--document-root",
                       str(studio["document_root"]), *sets(tmp, experiment)])


def test_queries_go_to_label_studio_and_labels_come_back(studio, prefect_harness, mlflow_uri, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", TOKEN)
    exp = "ls-loop"
    assert connect(studio, tmp_path, exp) == 0
    assert "connected to Label Studio" in capsys.readouterr().out
    assert tidal_main(["run", *sets(tmp_path, exp)]) == 0
    ws = tmp_path / "runs" / exp
    project_id = json.loads((ws / "labelstudio.json").read_text())["project_id"]
    projects = [p for p in api(studio, "/api/projects?page_size=1000")["results"] if p["title"] == f"tidal {exp}"]
    assert [p["id"] for p in projects] == [project_id]

    # One task per queried sample: the model's guess pre-filled, score and rank to sort by, and
    # the image served by Label Studio is the PNG the cycle wrote.
    query = list(csv.DictReader(open(ws / "cycles/0/query.csv", newline="")))
    tasks = sorted(tasks_of(studio, project_id), key=lambda t: t["data"]["rank"])
    assert [t["data"]["sample_id"] for t in tasks] == [r["id"] for r in query]
    assert [t["data"]["score"] for t in tasks] == [float(r["score"]) for r in query]
    predictions = api(studio, f"/api/predictions?task={tasks[0]['id']}")
    assert predictions[0]["result"][0]["value"]["choices"] == [query[0]["suggested_label"]]
    req = urllib.request.Request(studio["url"] + tasks[0]["data"]["image"], headers={"Authorization": f"Token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.read() == Path(query[0]["path"]).read_bytes()

    # Pushing again (a rerun after a crash between push and commit) adds no task.
    assert tidal_main(["labelstudio", "push", *sets(tmp_path, exp)]) == 0
    assert "pushed 0 task(s) (20 already there)" in capsys.readouterr().out
    assert len(tasks_of(studio, project_id)) == 20

    # Annotators: 8 answered (one of them twice, unanimously), one skipped, one disagreed on.
    truth = {}
    data = load_dataset(tmp_path / "data", "digits")
    names = dict(zip(data.pool_ids, (data.classes[y] for y in data.pool_labels.tolist())))
    second = api(studio, "/api/users", "POST", {"email": "ann2@example.com", "username": "ann2",
                                                 "password": "tidal-test-pw2"})["id"]
    for task in tasks[:8]:
        sid = task["data"]["sample_id"]
        truth[sid] = names[sid]
        annotate(studio, task["id"], names[sid])
    annotate(studio, tasks[0]["id"], names[tasks[0]["data"]["sample_id"]], second)
    disputed = tasks[8]["data"]["sample_id"]
    annotate(studio, tasks[8]["id"], data.classes[0])
    annotate(studio, tasks[8]["id"], data.classes[1], second)
    skipped = tasks[9]["data"]["sample_id"]
    annotate(studio, tasks[9]["id"], None)

    before = (ws / "state.json").read_bytes()
    assert tidal_main(["labelstudio", "pull", "--min-new", "15", *sets(tmp_path, exp)]) == 0
    assert "8 of 20 pending id(s) answered" in capsys.readouterr().out
    assert (ws / "state.json").read_bytes() == before  # below min_new: nothing imported

    assert tidal_main(["labelstudio", "pull", "--min-new", "5", *sets(tmp_path, exp)]) == 0
    out = capsys.readouterr().out
    assert "imported 8 new label(s)" in out and disputed in out
    after = state(tmp_path, exp)
    assert {i: data.classes[y] for i, y in after["labeled"].items() if i in truth} == truth
    assert {disputed, skipped} <= set(after["pending"]) and len(after["pending"]) == 12
    log = list(csv.DictReader(open(tmp_path / "data/labels" / f"{exp}.csv", newline="")))
    assert {r["id"] for r in log} == set(truth)
    by_id = {r["id"]: r for r in log}
    assert by_id[tasks[1]["data"]["sample_id"]]["annotator"] == "admin@example.com"
    assert by_id[tasks[0]["data"]["sample_id"]]["decided_by"] == "unanimous"

    # The next cycle trains on exactly those labels and pushes its query to the same project.
    assert tidal_main(["run", *sets(tmp_path, exp)]) == 0
    history = state(tmp_path, exp)["history"]
    assert [h["n_labeled"] for h in history] == [40, 48]
    assert len(tasks_of(studio, project_id)) == 40
    assert len([p for p in api(studio, "/api/projects?page_size=1000")["results"]
                if p["title"] == f"tidal {exp}"]) == 1


def test_label_studio_failures_are_named_and_change_nothing(studio, prefect_harness, mlflow_uri, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = "ls-errors"
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", "f" * 40)
    assert connect(studio, tmp_path, exp) == 2
    assert "refused the token in LABEL_STUDIO_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", TOKEN)
    down = f"http://127.0.0.1:{free_port()}"
    assert connect(studio, tmp_path, exp, url=down) == 2
    assert f"Label Studio at {down} is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "runs/labelstudio.json").exists()

    assert connect(studio, tmp_path, exp) == 0
    assert tidal_main(["run", *sets(tmp_path, exp)]) == 0
    ws = tmp_path / "runs" / exp
    project_id = json.loads((ws / "labelstudio.json").read_text())["project_id"]
    tasks = tasks_of(studio, project_id)
    names = load_dataset(tmp_path / "data", "digits").classes
    for task in tasks[:3]:
        annotate(studio, task["id"], names[0])

    # Label Studio gone while labels are pulled: a clear error, nothing written; a rerun completes.
    snapshot = {p: p.read_bytes() for p in sorted((tmp_path / "runs").rglob("*")) if p.is_file()}
    saved = (tmp_path / "runs/labelstudio.json").read_text()
    (tmp_path / "runs/labelstudio.json").write_text(saved.replace(studio["url"], down))
    assert tidal_main(["labelstudio", "pull", "--min-new", "1", *sets(tmp_path, exp)]) == 2
    assert "is not reachable" in capsys.readouterr().err
    (tmp_path / "runs/labelstudio.json").write_text(saved)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "runs").rglob("*")) if p.is_file()} == snapshot
    assert tidal_main(["labelstudio", "pull", "--min-new", "1", *sets(tmp_path, exp)]) == 0
    assert "imported 3 new label(s)" in capsys.readouterr().out

    # A task whose sample is not in the query: named, nothing imported.
    api(studio, f"/api/projects/{project_id}/import", "POST",
        [{"data": {"image": "", "sample_id": "no-such-id", "query_id": f"{exp}-cycle0", "cycle": 0}}])
    stray = [t for t in tasks_of(studio, project_id) if t["data"]["sample_id"] == "no-such-id"][0]
    annotate(studio, stray["id"], names[1])
    before = (ws / "state.json").read_bytes()
    assert tidal_main(["labelstudio", "pull", "--min-new", "1", *sets(tmp_path, exp)]) == 2
    assert "no-such-id" in capsys.readouterr().err
    assert (ws / "state.json").read_bytes() == before

    # The project deleted in Label Studio: pushing names it and says what to do.
    api(studio, f"/api/projects/{project_id}", "DELETE")
    assert tidal_main(["labelstudio", "push", *sets(tmp_path, exp)]) == 2
    assert f"project {project_id} of experiment 'ls-errors' is gone" in capsys.readouterr().err
    assert (ws / "state.json").read_bytes() == before
