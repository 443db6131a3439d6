"""CLI behaviour: errors come before anything starts, and an error from inside the flow ends
`tidal run` as one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tidal.cli import main as tidal_main


def test_misspelled_key_is_named(tmp_path: Path, capsys):
    code = tidal_main(["run", "--set", "trian.epochs=5", "--set", f"runs_dir={tmp_path}/runs"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown params key 'trian'" in err and "did you mean 'train'" in err
    assert not (tmp_path / "runs").exists()


def test_bad_value_in_params_file_is_named(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: many\n")
    assert tidal_main(["run", "--params", str(params)]) == 2
    assert "'train.epochs' must be an integer" in capsys.readouterr().err


def test_without_a_params_file_the_packaged_defaults_and_presets_apply(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./params.yaml here: the defaults and presets come from the package
    assert tidal_main(["run", "--set", "preset=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "'debug'" in err and "'paper-cifar10'" in err
    assert tidal_main(["status", "--experiment", "nope", "--set", "preset=debug"]) == 1
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_status_of_missing_experiment(tmp_path: Path, capsys):
    code = tidal_main(["status", "--experiment", "nope", "--set", f"runs_dir={tmp_path}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "experiments there" not in err
    for name in ("beta", "alpha"):  # experiments beside it are named, so a typo is easy to see
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    (tmp_path / "not-an-experiment").mkdir()
    assert tidal_main(["status", "--experiment", "nope", "--set", f"runs_dir={tmp_path}"]) == 1
    assert "(experiments there: alpha, beta; pick one with --experiment NAME)" in capsys.readouterr().err


def test_data_command_writes_and_versions(tmp_path: Path, capsys):
    assert tidal_main(["data", "--set", f"data_root={tmp_path}/data"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "data/digits/images.npy").is_file()
    assert "not pinned by DVC here" in out


def test_failed_distributed_training_ends_tidal_run_with_its_error(tmp_path: Path):
    """The flow re-raises what the train task raised, and the CLI ends with it as `error: ...`
    (exit 2), adding no traceback of its own. The real path: `tidal run` starts the flow (on
    Prefect's temporary server), the train task launches torchrun, rank 1 is killed at its first
    epoch (a failpoint). Before that line the terminal does show tracebacks that are not the CLI's:
    torchrun's report of the failed rank and Prefect's log of the failed task run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_"))}
    env.update({"TIDAL_FAILPOINT": "train_ddp:rank1:epoch", "OMP_NUM_THREADS": "1",
                "PREFECT_HOME": str(tmp_path / "prefect-home")})
    done = subprocess.run([str(Path(sys.executable).parent / "tidal"), "run", "--set", "preset=debug",
                           "--set", "tracking=false", "--set", "device=cpu", "--set", "distributed.nproc_per_node=2",
                           "--set", f"runs_dir={tmp_path}/runs", "--set", f"data_root={tmp_path}/data"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    # The error and the rank's last output; Prefect's own log lines may come before and after it.
    error = "error: distributed training of cycle 0 failed: rank 1 failed with exit code -9 (SIGKILL)"
    assert any(line.startswith(error) for line in done.stderr.splitlines()), done.stderr[-3000:]
    assert 'tidal/cli.py", line' not in done.stderr, done.stderr[-6000:]


def test_stack_down_where_no_stack_runs_says_so(tmp_path: Path, capsys):
    code = tidal_main(["stack", "down", "--dir", str(tmp_path / "stack")])
    out = capsys.readouterr().out
    assert code == 0 and "nothing to stop" in out and "stopped" not in out


def test_make_run_trains_on_one_torch_thread():
    """README's learning curve is `make run`'s output. CPU training repeats bit for bit only at a
    fixed torch thread count (torch's default is one per core, so it differs between machines):
    `make run` fixes it at one. `make -n` prints the commands without running them."""
    repo = Path(__file__).resolve().parents[2]
    dry = subprocess.run(["make", "-n", "run"], cwd=repo, capture_output=True, text=True, timeout=60)
    runs = [line for line in dry.stdout.splitlines() if line.rstrip().endswith("tidal run")]
    assert len(runs) == 1 and runs[0].startswith("OMP_NUM_THREADS=1 "), dry.stdout
