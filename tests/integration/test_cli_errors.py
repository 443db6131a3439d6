"""Input errors through the installed `tidal` console script: one short message, exit code 2,
no traceback, nothing written (issue #31, items 4 and 7)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TIDAL = Path(sys.executable).parent / "tidal"


def _tidal(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/m.db"}
    return subprocess.run([str(TIDAL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _one_clean_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    for text in expected:
        assert text in output, output


@pytest.mark.parametrize("override, expected", [
    ("train.milestones=[1", ("'train.milestones'", "[1")),
    ("experiment={a", ("'experiment'", "{a")),
    ("foo", ("key=value",)),
    ("=1", ("key=value",)),
    ("train=1", ("'train' must be a mapping",)),
    ("preset=[debug]", ("'preset'",)),
    ("experiment=..", ("'experiment'", "'..'")),
    ("experiment=.", ("'experiment'",)),
    ("experiment=a/b", ("'experiment'",)),
])
def test_a_bad_override_is_one_clean_error(tmp_path, override, expected):
    _one_clean_error(_tidal(tmp_path, "run", "--set", override), *expected)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".prefect") == []


def test_experiment_dot_dot_in_a_params_file_writes_nothing_into_the_repository(tmp_path):
    """`experiment: ..` made the repository root the workspace: params.yaml was overwritten."""
    (tmp_path / "runs").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text("# my comments\nexperiment: ..\n")
    _one_clean_error(_tidal(tmp_path, "run", "--set", "preset=debug"), "'experiment'")
    assert params.read_text() == "# my comments\nexperiment: ..\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".prefect") == ["params.yaml", "runs"]
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("command", ["status", "import-labels"])
@pytest.mark.parametrize("name", ["..", ".", "../x", "[1"])
def test_experiment_option_is_checked_as_a_name(tmp_path, command, name):
    args = [command, "--experiment", name] + (["answers.csv"] if command == "import-labels" else [])
    _one_clean_error(_tidal(tmp_path, *args), "'experiment'")


def test_experiment_option_is_a_name_not_yaml(tmp_path):
    """`--experiment 2024` is the experiment named 2024 (YAML would read the number 2024)."""
    result = _tidal(tmp_path, "status", "--experiment", "2024", "--set", f"runs_dir={tmp_path}/runs")
    assert result.returncode == 1 and "no experiment '2024'" in result.stderr, result.stdout + result.stderr


def test_register_name_is_checked(tmp_path):
    _one_clean_error(_tidal(tmp_path, "register", "--experiment", "e", "--name", "../x"), "--name")
