"""The UIs users look at, in a real headless Chromium (Debian's package; `make browser` installs
it): the MLflow UI and the Prefect UI served by real servers on 127.0.0.1 over a small grid
(random and entropy, the debug preset), and the HTML report of `tidal compare` opened from disk.

Chromium renders each page with its JavaScript (`--dump-dom` after a virtual-time budget, so
the single-page apps have fetched their data) and a screenshot is saved beside it in the test's
folder; a missing element fails naming it and the screenshot."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.integration.servers import background, free_port, http_json, wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STRATEGIES = ["random", "entropy"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("no chromium on PATH: `make browser` installs Debian's chromium package")
    return found


def render(url: str, shot: Path, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran, and its screenshot at `shot`."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1400,1000", f"--virtual-time-budget={budget_ms}",
             f"--user-data-dir={shot.parent / 'chromium-profile'}"]
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    (shot.with_suffix(".html")).write_text(dom)
    return dom


def expect(dom: str, needles: list[str], page: str, shot: Path) -> None:
    missing = [n for n in needles if n not in dom]
    assert not missing, f"{page}: missing {missing} (screenshot {shot}, DOM {shot.with_suffix('.html')})"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ui")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "CI": "1", "DO_NOT_TRACK": "1",
                "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1"})
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp / "mlartifacts"), "--host", "127.0.0.1",
                  "--port", str(mlflow_port), "--workers", "1"]
    with background(prefect_cmd, tmp / "prefect-server.log", env), \
            background(mlflow_cmd, tmp / "mlflow-server.log", env):
        wait_until(lambda: http_json(f"http://127.0.0.1:{prefect_port}/api/health"), 180, "Prefect server")
        wait_until(lambda: http_json(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search"
                                     "?max_results=1"), 180, "MLflow server")
        for strategy in STRATEGIES:
            done = subprocess.run([str(BIN / "tidal"), "run", "--set", "preset=debug", "--set", f"strategy={strategy}",
                                   "--set", f"experiment=ui-{strategy}", "--set", f"runs_dir={tmp}/runs",
                                   "--set", f"data_root={tmp}/data"], cwd=tmp, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = subprocess.run([str(BIN / "tidal"), "compare", "--experiment", "ui-random", "--experiment",
                                 "ui-entropy", "--out", str(tmp / "reports")], cwd=tmp, env=env,
                                capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        experiments = {s: client.get_experiment_by_name(f"ui-{s}") for s in STRATEGIES}
        runs = {s: client.search_runs([e.experiment_id]) for s, e in experiments.items()}
        yield {"tmp": tmp, "env": env, "mlflow": env["MLFLOW_TRACKING_URI"],
               "prefect": f"http://127.0.0.1:{prefect_port}", "experiments": experiments, "runs": runs}


def _parent(runs: list) -> object:
    return next(r for r in runs if r.data.tags.get("tidal.kind") == "experiment")


def test_mlflow_experiment_page_lists_the_grids_runs(grid):
    for strategy, exp in grid["experiments"].items():
        shot = grid["tmp"] / f"mlflow-runs-{strategy}.png"
        dom = render(f"{grid['mlflow']}/#/experiments/{exp.experiment_id}/runs", shot)
        expect(dom, [f"{strategy}-seed0"], f"MLflow runs page of ui-{strategy}", shot)
        assert shot.stat().st_size > 10_000


def test_mlflow_compares_the_strategies_runs(grid):
    parents = [_parent(grid["runs"][s]) for s in STRATEGIES]
    shot = grid["tmp"] / "mlflow-compare.png"
    compare = urllib.parse.urlencode({"runs": json.dumps([p.info.run_id for p in parents]),
                                      "experiments": json.dumps([e.experiment_id for e in grid["experiments"].values()])})
    dom = render(f"{grid['mlflow']}/#/compare-runs?{compare}", shot)
    expect(dom, ["test_accuracy", "random-seed0", "entropy-seed0"], "MLflow run comparison", shot)
    # Both experiments' runs in the chart view: test_accuracy plotted against the step, which is
    # the number of labels (40 and 60 in the debug preset).
    ids = json.dumps([e.experiment_id for e in grid["experiments"].values()]).replace(" ", "")
    shot = grid["tmp"] / "mlflow-charts.png"
    dom = render(f"{grid['mlflow']}/#/compare-experiments/s?experiments={ids}&compareRunsMode=CHART", shot)
    expect(dom, ["Displaying Runs from 2 Experiments", "random-seed0", "entropy-seed0", "test_accuracy",
                 "main-svg", ">Step<", ">60<"], "MLflow chart view of both strategies", shot)


def test_mlflow_models_view_lists_one_model_per_cycle(grid):
    exp = grid["experiments"]["random"]
    shot = grid["tmp"] / "mlflow-models.png"
    dom = render(f"{grid['mlflow']}/#/experiments/{exp.experiment_id}/models", shot)
    expect(dom, ["cycle-0", "cycle-1"], "MLflow Models view of ui-random", shot)


def test_prefect_ui_shows_the_flow_run_its_tasks_and_the_learning_curve(grid):
    api = grid["prefect"] + "/api"
    runs = http_json(f"{api}/flow_runs/filter", "POST", {"sort": "START_TIME_ASC"})
    flow_run = runs[0]
    shot = grid["tmp"] / "prefect-flow-run.png"
    dom = render(f"{grid['prefect']}/runs/flow-run/{flow_run['id']}", shot, budget_ms=25000)
    expect(dom, [flow_run["name"], "train-cycle-0", "export-query-cycle-1"], "Prefect flow run page", shot)
    shot = grid["tmp"] / "prefect-artifact-key.png"
    dom = render(f"{grid['prefect']}/artifacts/key/learning-curve-ui-random", shot, budget_ms=25000)
    expect(dom, ["learning-curve-ui-random", "Learning curve of ui-random"], "Prefect artifact history", shot)
    latest = http_json(f"{api}/artifacts/filter", "POST", {"artifacts": {"key": {"any_": ["learning-curve-ui-random"]}},
                                                            "sort": "CREATED_DESC", "limit": 1})[0]
    shot = grid["tmp"] / "prefect-artifact.png"
    dom = render(f"{grid['prefect']}/artifacts/artifact/{latest['id']}", shot, budget_ms=25000)
    expect(dom, ["test_accuracy", "n_labeled"], "Prefect learning-curve table", shot)


def test_compare_html_report_renders_from_disk(grid):
    report = grid["tmp"] / "reports" / "report.html"
    shot = grid["tmp"] / "report.png"
    dom = render(report.as_uri(), shot, budget_ms=3000)
    parents = {s: _parent(grid["runs"][s]) for s in STRATEGIES}
    expect(dom, ["<table id=\"aubc\"", ">random<", ">entropy<", "data:image/png;base64,",
                 *(p.info.run_id for p in parents.values())], "tidal compare HTML report", shot)
