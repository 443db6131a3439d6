"""Annotators in a real Label Studio (started here, on 127.0.0.1): a human-mode cycle pushes its
query as tasks, annotations made through Label Studio's API come back through `tidal labelstudio
pull` (the rules of import-labels), and the next cycle trains on exactly those labels."""
from __future__ import annotations

import csv
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.servers import free_port, http_json, label_studio
from tidal.cli import main as tidal_main
from tidal.data.sources import load_dataset
from tidal.data.version import dvc_dir_md5

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
    assert 0.0 <= predictions[0]["score"] <= 1.0  # the model's confidence, as Label Studio reads it
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


def test_projects_are_found_by_id_and_webhooks_carry_the_secret(studio, tmp_path, monkeypatch):
    """Issue #31, item 3, in a real Label Studio: a project another user titled as tidal would is
    not adopted, two experiments whose names share 44 characters get a project each, a recorded id
    that names a project tidal did not create is refused; the webhook carries the shared secret."""
    from tidal.labeling import labelstudio

    monkeypatch.setenv("LABEL_STUDIO_TOKEN", TOKEN)
    client = labelstudio.Client(studio["url"], "LABEL_STUDIO_TOKEN")
    config = "<View><Image name='image' value='$image'/><Choices name='label' toName='image'>" \
             "<Choice value='a'/></Choices></View>"
    squatter = api(studio, "/api/projects", "POST", {"title": "tidal ls-squat", "label_config": config})["id"]

    def project(experiment: str) -> int:
        (tmp_path / experiment).mkdir(exist_ok=True)
        return labelstudio._project(client, {"experiment": experiment}, tmp_path / experiment, config)

    ours = project("ls-squat")
    assert ours != squatter
    common = "x" * 44
    assert len({project(common + "-one"), project(common + "-two"), ours}) == 3
    assert project("ls-squat") == ours
    record = tmp_path / "ls-squat" / "labelstudio.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "project_id": squatter}))
    with pytest.raises(labelstudio.LabelStudioError, match="not the project tidal created"):
        project("ls-squat")

    url = "http://127.0.0.1:9/webhook"
    labelstudio._webhook_for(client, ours, url, "first-secret")
    labelstudio._webhook_for(client, ours, url, "second-secret")  # a new secret replaces the old one
    hooks = [h for h in api(studio, f"/api/webhooks?project={ours}") if h["url"] == url]
    assert [h["headers"] for h in hooks] == [{labelstudio.SECRET_HEADER: "second-secret"}]


def test_labels_arriving_run_the_next_cycle_once(studio, tmp_path):
    """Label Studio's webhook -> `tidal labelstudio listen` -> a Prefect event -> the
    `labels-arrived` deployment's trigger -> a worker runs the next cycle, once, on exactly the
    labels that arrived; a burst of 100 repeated deliveries runs no second cycle, and the
    deployment's runs never overlap (its concurrency limit)."""
    import os
    import subprocess
    import sys
    import time

    from tests.integration.servers import background, wait_until

    repo, bin_dir = Path(__file__).resolve().parents[2], Path(sys.executable).parent
    prefect_port, listen_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "CI": "1", "DO_NOT_TRACK": "1",
                "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", "PWD": str(repo), "LABEL_STUDIO_TOKEN": TOKEN})
    exp = "ls-trigger"
    overrides = ["preset=debug", "label_mode=human", f"experiment={exp}", f"runs_dir={tmp_path}/runs",
                 f"data_root={tmp_path}/data", "labelstudio.min_new=2"]

    def tidal(*args: str) -> str:
        done = subprocess.run([str(bin_dir / "tidal"), *args, *sum((["--set", o] for o in overrides), [])],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def prefect(*args: str) -> None:
        done = subprocess.run([str(bin_dir / "prefect"), *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def runs_of(deployment_id: str) -> list[dict]:
        return http_json(f"{api_url}/flow_runs/filter", "POST",
                         {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})

    server = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    listener = [str(bin_dir / "tidal"), "labelstudio", "listen", "--port", str(listen_port)]
    worker = [str(bin_dir / "prefect"), "worker", "start", "--pool", "tidal-pool", "--type", "process",
              "--prefetch-seconds", "5"]
    with background(server, tmp_path / "prefect-server.log", env):
        wait_until(lambda: http_json(f"{api_url}/health"), 180, "Prefect server")
        prefect("work-pool", "create", "tidal-pool", "--type", "process")
        prefect("--no-prompt", "deploy", "--name", "labels-arrived")
        deployment = http_json(f"{api_url}/deployments/name/labels-arrived/labels-arrived")
        http_json(f"{api_url}/deployments/{deployment['id']}", "PATCH",
                  {"parameters": {"params_path": "params.yaml", "overrides": overrides}})
        automations = http_json(f"{api_url}/automations/related-to/prefect.deployment.{deployment['id']}")
        assert len(automations) == 1 and automations[0]["trigger"]["expect"] == ["tidal.labels.arrived"]

        with background(listener, tmp_path / "listener.log", env, cwd=tmp_path), \
                background(worker, tmp_path / "worker.log", env, cwd=repo):
            tidal("labelstudio", "connect", "--url", studio["url"], "--document-root", str(studio["document_root"]),
                  "--webhook-url", f"http://127.0.0.1:{listen_port}/webhook")
            # The data folder pinned by DVC, as in a user's repository: labels that arrive re-pin it.
            tidal("data")
            for cmd in (["git", "init", "-q"], [str(bin_dir / "dvc"), "init", "-q"],
                        [str(bin_dir / "dvc"), "add", "-q", "data"]):
                subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
            pinned_before = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
            tidal("run")
            ws = tmp_path / "runs" / exp
            project_id = json.loads((ws / "labelstudio.json").read_text())["project_id"]
            tasks = sorted(tasks_of(studio, project_id), key=lambda t: t["data"]["rank"])
            data = load_dataset(tmp_path / "data", "digits")
            names = dict(zip(data.pool_ids, (data.classes[y] for y in data.pool_labels.tolist())))
            labeled = [t["data"]["sample_id"] for t in tasks[:2]]
            annotate(studio, tasks[0]["id"], names[labeled[0]])  # 1 of min_new=2: no cycle yet
            wait_until(lambda: len(runs_of(deployment["id"])) >= 1, 120, "the first triggered run")
            annotate(studio, tasks[1]["id"], names[labeled[1]])  # 2: the next cycle runs
            # The same webhook delivered again 100 times at once (Label Studio after timeouts, or
            # anyone holding the secret), signed as Label Studio signs it.
            from concurrent.futures import ThreadPoolExecutor

            from tidal.labeling.labelstudio import SECRET_HEADER, read_webhook_secret

            body = json.dumps({"action": "ANNOTATION_CREATED",
                               "task": {"id": tasks[1]["id"], "data": tasks[1]["data"]}}).encode()
            headers = {"Content-Type": "application/json",
                       SECRET_HEADER: read_webhook_secret(tmp_path / "runs" / "labelstudio_webhook.secret")}

            def redeliver(_: int) -> int:
                req = urllib.request.Request(f"http://127.0.0.1:{listen_port}/webhook", data=body, method="POST",
                                             headers=headers)
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status

            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(redeliver, range(100))) == [202] * 100

            def settled() -> list[dict] | None:
                runs = runs_of(deployment["id"])
                done = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
                cycles = len(state(tmp_path, exp)["history"])
                return runs if runs and len(done) == len(runs) and cycles == 2 else None

            wait_until(settled, 480, "the triggered flow runs", interval=3)
            time.sleep(15)  # room for a late event's run to be created and run
            runs = wait_until(settled, 240, "the triggered flow runs", interval=3)
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED"] * len(runs), \
        (tmp_path / "worker.log").read_text()[-4000:]
    # Two annotations and 100 repeated deliveries: a run per annotation, at most one for the burst.
    assert 2 <= len(runs) <= 3, len(runs)
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # one at a time
    history = state(tmp_path, exp)["history"]
    assert [h["n_labeled"] for h in history] == [40, 42]  # one new cycle, on exactly the two labels
    assert set(labeled) <= set(state(tmp_path, exp)["labeled"])
    log = list(csv.DictReader(open(tmp_path / "data/labels" / f"{exp}.csv", newline="")))
    assert sorted(r["id"] for r in log) == sorted(labeled)
    assert len(tasks_of(studio, project_id)) == 40  # cycle 1's query pushed by the triggered run
    pinned_after = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
    assert pinned_after != pinned_before and pinned_after == dvc_dir_md5(tmp_path / "data") + ".dir"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs_ml = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    cycles = sorted(int(r.data.tags["cycle"]) for r in runs_ml if r.data.tags.get("tidal.kind") == "cycle")
    assert cycles == [0, 1]
    assert all(r.info.status == "FINISHED" for r in runs_ml if r.data.tags.get("tidal.kind") == "cycle")
