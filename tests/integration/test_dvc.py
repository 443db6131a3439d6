"""`dvc repro` in a fresh git repository holding a copy of this project."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tidal.data.version import dvc_dir_md5

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    # Not the benchmark results: the DVC tests need none of them, and a grid running beside the
    # suite writes new files there while the copy is made.
    return [f for f in out if not f.startswith(("tests/", "benchmarks/results/")) and (REPO / f).is_file()]


@pytest.fixture
def project_copy(tmp_path: Path, migrated_mlflow_db: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    for rel in _project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("preset: null", "preset: debug"))
    shutil.copy(migrated_mlflow_db, tmp_path / "mlflow.db")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CI": "1",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)  # its own temporary server, not a test harness's
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)
    return repo, env


@pytest.fixture
def on_harness(project_copy, prefect_harness) -> tuple[Path, dict]:
    """The project copy with its commands on the session's Prefect test server: a temporary
    server per command (what `test_dvc_repro_on_a_fresh_clone` keeps) costs 8-16 s each here."""
    from prefect.settings import PREFECT_API_URL

    repo, env = project_copy
    return repo, {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}


def _run(cmd: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def test_dvc_repro_on_a_fresh_clone(project_copy):
    repo, env = project_copy
    # A fresh clone has no data and no DVC cache: DVC refuses, as documented ...
    first = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert first.returncode != 0 and "missing data" in first.stdout + first.stderr
    # ... until the embedded data is written; it must match the committed pin bit for bit.
    data = _run([str(BIN / "tidal"), "data"], repo, env)
    assert data.returncode == 0, data.stderr
    assert "matches its DVC pin" in data.stdout
    repro = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert (repo / "dvc.lock").is_file()
    metrics = (repo / "runs/digits-tidal/metrics.json").read_text()
    assert '"cycles_done": 2' in metrics
    status = _run([str(BIN / "dvc"), "status"], repo, env)
    assert status.returncode == 0
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    # Declared metrics and plots are readable by DVC itself.
    shown = _run([str(BIN / "dvc"), "metrics", "show"], repo, env)
    assert "final_accuracy" in shown.stdout
    # Reproducing again from scratch gives the same selections and accuracies, bit for bit.
    ws = repo / "runs/digits-tidal"
    first_run = {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted(ws.rglob("*.csv"))}
    again = _run([str(BIN / "dvc"), "repro", "--force"], repo, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    second_run = {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted(ws.rglob("*.csv"))}
    assert "cycles/1/query.csv" in first_run and "learning_curve.csv" in first_run
    assert second_run == first_run
    # A params key the stage does not name leaves it up to date; one it names invalidates it.
    params = repo / "params.yaml"
    params.write_text(params.read_text() + "score_batch_size: 256\n")
    assert "Data and pipelines are up to date" in _run([str(BIN / "dvc"), "status"], repo, env).stdout
    params.write_text(params.read_text().replace("seed: 0", "seed: 1"))
    changed = _run([str(BIN / "dvc"), "status"], repo, env).stdout
    assert "params.yaml" in changed and "modified:" in changed and "seed" in changed


def test_label_import_repins_the_data(on_harness):
    """Human mode in a real DVC repo: importing labels appends them under data/ and `dvc add`
    re-pins it, so data.dvc names the labeled version and `dvc status` is clean."""
    repo, env = on_harness
    assert _run([str(BIN / "tidal"), "data"], repo, env).returncode == 0
    pinned_before = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    sets = ["--set", "label_mode=human", "--set", "experiment=h"]
    first = _run([str(BIN / "tidal"), "run", *sets], repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "WAITING FOR LABELS" in first.stdout
    query = repo / "runs/h/cycles/0/query.csv"
    with open(query, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"] = r["suggested_label"]  # an annotator who agrees with the model
    back = repo / "back.csv"
    with open(back, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    imported = _run([str(BIN / "tidal"), "import-labels", str(back), *sets], repo, env)
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    assert "re-pinned in data.dvc" in imported.stdout
    pinned_after = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert pinned_after != pinned_before
    assert pinned_after == dvc_dir_md5(repo / "data") + ".dir"
    assert (repo / "data/labels/h.csv").is_file()
    status = _run([str(BIN / "dvc"), "status", "data.dvc"], repo, env)
    assert "up to date" in status.stdout, status.stdout
    # The next cycle runs on the new labels against the new pin.
    second = _run([str(BIN / "tidal"), "run", *sets], repo, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (repo / "runs/h/cycles/1/query.csv").is_file()


def test_a_shared_directory_remote_moves_the_pinned_data_between_clones(project_copy, tmp_path):
    """docs/scaling.md: `dvc remote add -d` + `dvc push` on one machine, `dvc pull` on
    another restores exactly the pinned data (a shared directory stands in for S3)."""
    repo, env = project_copy
    dvc = str(BIN / "dvc")
    store = tmp_path / "dvc-store"
    assert _run([str(BIN / "tidal"), "data"], repo, env).returncode == 0
    # The pin was computed without DVC: `dvc commit` puts the matching files into DVC's cache.
    committed = _run([dvc, "commit", "-f", "data.dvc"], repo, env)
    assert committed.returncode == 0, committed.stderr
    assert _run([dvc, "remote", "add", "-d", "shared", str(store)], repo, env).returncode == 0
    pushed = _run([dvc, "push", "data.dvc"], repo, env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run([*git, "commit", "-qam", "remote"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "data").exists()
    # data.dvc only: the experiment stage's outputs are rebuilt by `dvc repro`, not pulled.
    pulled = _run([dvc, "pull", "data.dvc"], clone, env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    original = {p.relative_to(repo / "data"): p.read_bytes() for p in (repo / "data").rglob("*") if p.is_file()}
    restored = {p.relative_to(clone / "data"): p.read_bytes() for p in (clone / "data").rglob("*") if p.is_file()}
    assert restored == original and original
    check = _run([str(BIN / "tidal"), "data"], clone, env)
    assert check.returncode == 0 and "matches its DVC pin" in check.stdout, check.stdout + check.stderr


def _human_experiment(repo: Path, env: dict, name: str) -> tuple[list[str], Path]:
    """A human-mode debug experiment waiting for its first labels; returns its --set args and an
    annotated query (every label the model's suggestion)."""
    sets = ["--set", "preset=debug", "--set", "label_mode=human", "--set", f"experiment={name}",
            "--set", "tracking=false"]
    assert _run([str(BIN / "tidal"), "data"], repo, env).returncode == 0
    first = _run([str(BIN / "tidal"), "run", *sets], repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(repo / f"runs/{name}/cycles/0/query.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"] = r["suggested_label"]
    back = repo / f"{name}-back.csv"
    with open(back, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return sets, back


def test_import_without_the_venv_on_path_uses_the_packages_dvc(on_harness):
    """`.venv/bin/tidal import-labels` with the venv not active: DVC is found beside the Python
    that runs tidal, the pin is renewed, and the import is fast (no Prefect server)."""
    repo, env = on_harness
    sets, back = _human_experiment(repo, env, "nopath")
    bare = {**env, "PATH": "/usr/bin:/bin"}  # no .venv/bin: `dvc` is not on PATH
    imported = _run([str(BIN / "tidal"), "import-labels", str(back), "--experiment", "nopath",
                     "--set", "tracking=false"], repo, bare)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "re-pinned in data.dvc" in imported.stdout
    assert yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"] == dvc_dir_md5(repo / "data") + ".dir"
    assert "Prefect" not in imported.stdout + imported.stderr  # no server started, no flow run logs


@pytest.mark.parametrize("failpoint", ["import:logged", "import:pinned"])
def test_an_import_killed_part_way_is_finished_by_the_next_run(on_harness, failpoint):
    """SIGKILL after the labels log (before state.json / the pin / the journal's removal): the
    next `tidal run` finishes the import first, so nothing labelled is lost and the pin holds."""
    repo, env = on_harness
    sets, back = _human_experiment(repo, env, "crash")
    killed = _run([str(BIN / "tidal"), "import-labels", str(back), *sets], repo,
                  {**env, "TIDAL_FAILPOINT": failpoint})
    assert killed.returncode == -9
    assert (repo / "runs/crash/import.json").is_file()  # the journal says an import is open
    log_rows = (repo / "data/labels/crash.csv").read_text().splitlines()
    assert len(log_rows) == 1 + 20
    again = _run([str(BIN / "tidal"), "run", *sets], repo, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (repo / "runs/crash/import.json").exists()
    state = json.loads((repo / "runs/crash/state.json").read_text())
    assert len(state["labeled"]) == 40 + 20  # the initial set and every imported label
    assert len(state["imports"]) == 1  # finished once, not counted twice
    assert yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"] == dvc_dir_md5(repo / "data") + ".dir"
    assert (repo / "runs/crash/cycles/1/query.csv").is_file()  # the next cycle trained on the labels
    # the same file imported again is a no-op, not a conflict
    redo = _run([str(BIN / "tidal"), "import-labels", str(back), *sets], repo, env)
    assert redo.returncode == 0 and "imported 0 new label(s)" in redo.stdout, redo.stdout + redo.stderr


def test_an_import_killed_before_its_log_is_written_imports_nothing_until_rerun(on_harness):
    """SIGKILL after the journal, before the labels log: no label is counted as imported (the
    experiment still waits), and running the same import again imports every label once."""
    repo, env = on_harness
    sets, back = _human_experiment(repo, env, "early")
    killed = _run([str(BIN / "tidal"), "import-labels", str(back), *sets], repo,
                  {**env, "TIDAL_FAILPOINT": "import:journal"})
    assert killed.returncode == -9
    assert not (repo / "data/labels/early.csv").exists()
    status = _run([str(BIN / "tidal"), "status", *sets], repo, env)  # reads state, finishes nothing
    assert status.returncode == 0, status.stdout + status.stderr
    waiting = _run([str(BIN / "tidal"), "run", *sets], repo, env)  # drops the journal: nothing to commit
    assert waiting.returncode == 0, waiting.stdout[-3000:] + waiting.stderr[-3000:]
    assert not (repo / "runs/early/import.json").exists()
    state = json.loads((repo / "runs/early/state.json").read_text())
    assert len(state["labeled"]) == 40 and len(state["pending"]) == 20 and state["awaiting_labels"]
    assert not state.get("imports") and not (repo / "runs/early/cycles/1").exists()
    again = _run([str(BIN / "tidal"), "import-labels", str(back), *sets], repo, env)
    assert again.returncode == 0 and "imported 20 new label(s)" in again.stdout, again.stdout + again.stderr
    state = json.loads((repo / "runs/early/state.json").read_text())
    assert len(state["labeled"]) == 60 and not state["pending"] and len(state["imports"]) == 1
    assert len((repo / "data/labels/early.csv").read_text().splitlines()) == 1 + 20


def test_a_stale_pin_from_labels_is_never_answered_with_dvc_checkout(on_harness):
    repo, env = on_harness
    assert _run([str(BIN / "tidal"), "data"], repo, env).returncode == 0
    assert _run([str(BIN / "dvc"), "commit", "-f", "data.dvc"], repo, env).returncode == 0  # the pin's listing in the cache
    (repo / "data/labels").mkdir()
    (repo / "data/labels/other.csv").write_text("id,label\n")
    out = _run([str(BIN / "tidal"), "run", "--set", "preset=debug", "--set", "tracking=false"], repo, env)
    assert out.returncode == 2
    assert "only in imported labels (labels/other.csv)" in out.stderr
    assert "do not `dvc checkout`" in out.stderr and "dvc add data" in out.stderr
    assert out.stderr.count("\n") <= 3, out.stderr  # one clear message, no traceback


def test_an_import_into_one_experiment_leaves_the_others_data_version(on_harness):
    """Two human experiments on one pinned data/: labels imported into one change its data
    version and the pin, not the other's version, and the other still runs on the new pin."""
    repo, env = on_harness
    sets_a, back_a = _human_experiment(repo, env, "exp-a")
    sets_b, _ = _human_experiment(repo, env, "exp-b")
    before_a = json.loads((repo / "runs/exp-a/state.json").read_text())["data_version"]
    before_b = json.loads((repo / "runs/exp-b/state.json").read_text())["data_version"]
    assert before_a == before_b  # no labels yet: both are the pool's version
    imported = _run([str(BIN / "tidal"), "import-labels", str(back_a), *sets_a], repo, env)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    after_a = json.loads((repo / "runs/exp-a/state.json").read_text())["data_version"]
    assert after_a != before_a
    again_b = _run([str(BIN / "tidal"), "run", *sets_b], repo, env)  # still waiting, but checks the pin
    assert again_b.returncode == 0, again_b.stdout[-2000:] + again_b.stderr[-2000:]
    assert json.loads((repo / "runs/exp-b/state.json").read_text())["data_version"] == before_b
