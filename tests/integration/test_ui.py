"""The UIs users look at, in a real headless Chromium (Debian's package; `make browser` installs
it): the MLflow UI and the Prefect UI served by real servers on 127.0.0.1 over a small grid
(random and entropy, the debug preset) logged as one study, and the HTML report of `tidal compare`
opened from disk.

The grid is the path a user takes to compare strategies: both experiments (`ui-random`,
`ui-entropy`) run with `--set study=ui-grid`, so MLflow holds ONE experiment, `ui-grid`, with a
parent run per cell (`random-seed0`, `entropy-seed0`); its runs page and its chart view show both
runs, their accuracy overlaid against the number of labels, with no second experiment to tick.

The servers ask for credentials as `tidal stack up` starts them (tidal/stack.py: Prefect's API
auth string, MLflow's basic-auth app), and the browser gives them as a user does: the Prefect
UI's login stores the auth string in the page's localStorage, the MLflow UI gets HTTP basic auth.
Chromium is driven over its DevTools protocol (a websocket): each page is read until every
expected element is in its DOM (or the time is up), and a screenshot is saved beside it in the
test's folder; a missing element fails naming it and the screenshot."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.servers import background, free_port, wait_until
from tidal.stack import client_env, credentials, mlflow_auth_env, prefect_server_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STRATEGIES = ["random", "entropy"]
STUDY = "ui-grid"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("no chromium on PATH: `make browser` installs Debian's chromium package")
    return found


def basic(user_password: str) -> str:
    return "Basic " + base64.b64encode(user_password.encode()).decode()


class DevTools:
    """One headless Chromium and its first tab, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)
        self.proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", "--window-size=1400,1000",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Chromium writes the port it chose into the profile once it listens.
            port = wait_until(lambda: (profile / "DevToolsActivePort").read_text().split()[0], 60, "Chromium")
            tabs = wait_until(lambda: [t for t in json.load(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=5)) if t["type"] == "page"], 60, "Chromium's tab")
            self.socket = connect(tabs[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        except BaseException:
            self.close()
            raise
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive between the answers; only this call's answer counts
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def dom(self) -> str:
        found = self.call("Runtime.evaluate", expression="document.documentElement.outerHTML", returnByValue=True)
        return found["result"].get("value", "")

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def render(url: str, shot: Path, needles: list[str], timeout_s: float = 60, authorization: str | None = None,
           prefect_login: str | None = None) -> str:
    """The page's DOM once every needle is in it (or after timeout_s), and its screenshot at `shot`.
    `authorization`: an Authorization header on every request (HTTP basic auth, as a browser sends
    it after its prompt). `prefect_login`: the auth string the Prefect UI's login form stores."""
    browser = DevTools(shot.parent / f"chromium-{shot.stem}")
    try:
        browser.call("Network.enable")
        if authorization is not None:
            browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": authorization})
        if prefect_login is not None:  # what the login form does: the string, base64, in localStorage
            origin = urllib.parse.urlsplit(url)
            browser.call("Page.navigate", url=f"{origin.scheme}://{origin.netloc}/api/health")
            wait_until(lambda: browser.call("Runtime.evaluate", expression="location.pathname + document.readyState",
                                            returnByValue=True)["result"]["value"] == "/api/healthcomplete",
                       60, "Prefect's origin")
            stored = base64.b64encode(prefect_login.encode()).decode()
            browser.call("Runtime.evaluate", expression=f"localStorage.setItem('prefect-password', '{stored}')")
        browser.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while not all(n in (dom := browser.dom()) for n in needles) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)  # let the last data paint before the screenshot
        dom = browser.dom()
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    shot.with_suffix(".html").write_text(dom)
    return dom


def api(url: str, auth: str, body: dict | None = None) -> dict | list:
    """A JSON call to a server that wants basic auth ("user:password"; Prefect's auth string is one)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": basic(auth)})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def expect(dom: str, needles: list[str], page: str, shot: Path) -> None:
    missing = [n for n in needles if n not in dom]
    assert not missing, f"{page}: missing {missing} (screenshot {shot}, DOM {shot.with_suffix('.html')})"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ui")
    creds = credentials(tmp)
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "CI": "1", "DO_NOT_TRACK": "1",
                "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", **client_env(creds)})
    prefect_env = {**env, **prefect_server_env(creds)}
    mlflow_env = {**env, **mlflow_auth_env(creds, tmp / "mlflow-auth.ini", f"sqlite:///{tmp / 'mlflow-auth.db'}")}
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp / "mlartifacts"), "--host", "127.0.0.1",
                  "--port", str(mlflow_port), "--workers", "1"]
    mlflow_auth = f"{creds['mlflow_username']}:{creds['mlflow_password']}"
    with background(prefect_cmd, tmp / "prefect-server.log", prefect_env), \
            background(mlflow_cmd, tmp / "mlflow-server.log", mlflow_env), pytest.MonkeyPatch.context() as patch:
        wait_until(lambda: api(f"http://127.0.0.1:{prefect_port}/api/health", creds["prefect_auth_string"]), 180,
                   "Prefect server")
        wait_until(lambda: api(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1",
                               mlflow_auth), 180, "MLflow server")
        for strategy in STRATEGIES:
            done = subprocess.run([str(BIN / "tidal"), "run", "--set", "preset=debug", "--set", f"strategy={strategy}",
                                   "--set", f"experiment=ui-{strategy}", "--set", f"study={STUDY}",
                                   "--set", f"runs_dir={tmp}/runs",
                                   "--set", f"data_root={tmp}/data"], cwd=tmp, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # the study's name selects every experiment of it, as a user compares a grid
        report = subprocess.run([str(BIN / "tidal"), "compare", "--experiment", STUDY, "--out", str(tmp / "reports")],
                                cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for key, value in client_env(creds).items():  # this process's MLflow client, not the next file's
            patch.setenv(key, value)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        # one MLflow experiment, the study's, holds both parent runs and their cycle runs; none
        # is named after an experiment of the grid
        study = client.get_experiment_by_name(STUDY)
        assert study is not None and all(client.get_experiment_by_name(f"ui-{s}") is None for s in STRATEGIES)
        runs = client.search_runs([study.experiment_id], max_results=1000)
        parents = {s: [r for r in runs if r.data.tags.get("tidal.kind") == "experiment"
                       and r.data.tags.get("tidal.experiment") == f"ui-{s}"] for s in STRATEGIES}
        assert all(len(p) == 1 for p in parents.values()), parents
        parents = {s: p[0] for s, p in parents.items()}
        assert {s: p.info.run_name for s, p in parents.items()} == {s: f"{s}-seed0" for s in STRATEGIES}
        models = client.search_logged_models(experiment_ids=[study.experiment_id])
        yield {"tmp": tmp, "env": env, "mlflow": env["MLFLOW_TRACKING_URI"],
               "prefect": f"http://127.0.0.1:{prefect_port}", "study": study, "runs": runs, "parents": parents,
               "models": list(models),
               "prefect_auth": creds["prefect_auth_string"], "mlflow_auth": mlflow_auth}


def mlflow_page(grid: dict, path: str, shot: Path, needles: list[str]) -> str:
    return render(f"{grid['mlflow']}/{path}", shot, needles, authorization=basic(grid["mlflow_auth"]))


def prefect_page(grid: dict, path: str, shot: Path, needles: list[str]) -> str:
    return render(f"{grid['prefect']}/{path}", shot, needles, prefect_login=grid["prefect_auth"])


def test_the_uis_ask_for_credentials(grid):
    # Prefect's UI says its API refused it and shows none of the data; MLflow's asks the browser
    # for basic auth.
    flow_run = api(f"{grid['prefect']}/api/flow_runs/filter", grid["prefect_auth"], {"sort": "START_TIME_ASC"})[0]
    shot = grid["tmp"] / "prefect-no-login.png"
    dom = render(f"{grid['prefect']}/runs/flow-run/{flow_run['id']}", shot, ["Authentication failed"])
    expect(dom, ["Authentication failed"], "Prefect UI without its auth string", shot)
    assert flow_run["name"] not in dom and "train-cycle-0" not in dom
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{grid['mlflow']}/", timeout=30)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Basic")


def test_mlflow_experiment_page_lists_the_grids_runs(grid):
    # The study's one experiment page lists both strategies' parent runs, each linked inside that
    # experiment: had they gone to an experiment each, this page would hold one of them.
    study_id = grid["study"].experiment_id
    shot = grid["tmp"] / "mlflow-runs-study.png"
    needles = [f">{STUDY}<", *(f"{s}-seed0" for s in STRATEGIES),
               *(f"#/experiments/{study_id}/runs/{p.info.run_id}\"" for p in grid["parents"].values())]
    dom = mlflow_page(grid, f"#/experiments/{study_id}/runs", shot, needles)
    expect(dom, needles, f"MLflow runs page of {STUDY}", shot)
    assert shot.stat().st_size > 10_000


def test_mlflow_compares_the_strategies_runs(grid):
    parents = [grid["parents"][s] for s in STRATEGIES]
    study_id = grid["study"].experiment_id
    shot = grid["tmp"] / "mlflow-compare.png"
    compare = urllib.parse.urlencode({"runs": json.dumps([p.info.run_id for p in parents]),
                                      "experiments": json.dumps([study_id])})
    needles = ["Comparing 2 Runs from 1 Experiment", f">{STUDY}<", "accuracy_by_cycle", "random-seed0", "entropy-seed0"]
    dom = mlflow_page(grid, f"#/compare-runs?{compare}", shot, needles)
    expect(dom, needles, "MLflow run comparison", shot)
    # The chart view of the study's one experiment, nothing ticked: the accuracy chart holds
    # both strategies' runs (its legend names each), plotted against the step, which is the number
    # of labels (40 and 60 in the debug preset).
    shot = grid["tmp"] / "mlflow-charts.png"
    needles = [f">{STUDY}<", "random-seed0", "entropy-seed0", "title=\"accuracy\"", "main-svg",
               *(f">{s}-seed0 (accuracy)<" for s in STRATEGIES), ">Step<", ">40<", ">60<"]
    dom = mlflow_page(grid, f"#/experiments/{study_id}/runs?compareRunsMode=CHART", shot, needles)
    expect(dom, needles, f"MLflow chart view of {STUDY}", shot)


def test_mlflow_models_view_lists_one_model_per_cycle(grid):
    # The study's Models view: one model per cycle of each strategy (cycle-0 and cycle-1 twice),
    # each linked by its own id.
    study_id = grid["study"].experiment_id
    models = grid["models"]
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in grid["runs"]}
    for strategy, parent in grid["parents"].items():
        names = sorted(m.name for m in models if parent_of.get(m.source_run_id) == parent.info.run_id)
        assert names == ["cycle-0", "cycle-1"], (strategy, names)
    assert len(models) == 2 * len(STRATEGIES)
    shot = grid["tmp"] / "mlflow-models.png"
    needles = [f">{STUDY}<", *(f"#/experiments/{study_id}/models/{m.model_id}\">{m.name}<" for m in models)]
    dom = mlflow_page(grid, f"#/experiments/{study_id}/models", shot, needles)
    expect(dom, needles, f"MLflow Models view of {STUDY}", shot)


def test_prefect_ui_shows_the_flow_run_its_tasks_and_the_learning_curve(grid):
    base, auth = grid["prefect"] + "/api", grid["prefect_auth"]
    flow_run = api(f"{base}/flow_runs/filter", auth, {"sort": "START_TIME_ASC"})[0]
    shot = grid["tmp"] / "prefect-flow-run.png"
    needles = [flow_run["name"], "train-cycle-0", "export-query-cycle-1"]
    dom = prefect_page(grid, f"runs/flow-run/{flow_run['id']}", shot, needles)
    expect(dom, needles, "Prefect flow run page", shot)
    shot = grid["tmp"] / "prefect-artifact-key.png"
    needles = ["learning-curve-ui-random", "Learning curve of ui-random"]
    dom = prefect_page(grid, "artifacts/key/learning-curve-ui-random", shot, needles)
    expect(dom, needles, "Prefect artifact history", shot)
    latest = api(f"{base}/artifacts/filter", auth, {"artifacts": {"key": {"any_": ["learning-curve-ui-random"]}},
                                                    "sort": "CREATED_DESC", "limit": 1})[0]
    shot = grid["tmp"] / "prefect-artifact.png"
    needles = [">accuracy<", "n_labeled"]
    dom = prefect_page(grid, f"artifacts/artifact/{latest['id']}", shot, needles)
    expect(dom, needles, "Prefect learning-curve table", shot)


def test_compare_html_report_renders_from_disk(grid):
    # `tidal compare --experiment ui-grid` tells the study's experiments apart and links each to
    # its parent run in the study's MLflow experiment.
    report = grid["tmp"] / "reports" / "report.html"
    shot = grid["tmp"] / "report.png"
    study_id = grid["study"].experiment_id
    needles = ["<table id=\"aubc\"", ">random<", ">entropy<", "data:image/png;base64,",
               *(f"href=\"{grid['mlflow']}/#/experiments/{study_id}/runs/{p.info.run_id}\">ui-{s}: {s}, seed 0<"
                 for s, p in grid["parents"].items())]
    dom = render(report.as_uri(), shot, needles, timeout_s=10)
    expect(dom, needles, "tidal compare HTML report", shot)
