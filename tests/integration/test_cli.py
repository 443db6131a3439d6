"""CLI behaviour that needs no Prefect server: errors come before anything starts."""
from __future__ import annotations

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


def test_failed_distributed_training_is_one_clear_line(monkeypatch, capsys):
    """The flow re-raises what the train task raised; the CLI prints it without a traceback."""
    import tidal.cli
    from tidal.launch import DistributedTrainingFailed

    def failing_run(args):
        raise DistributedTrainingFailed("distributed training of cycle 0 failed: rank 1 failed with exit code -9")

    monkeypatch.setattr(tidal.cli, "cmd_run", failing_run)
    assert tidal_main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: distributed training of cycle 0 failed: rank 1") and "Traceback" not in err


def test_stack_down_where_no_stack_runs_says_so(tmp_path: Path, capsys):
    code = tidal_main(["stack", "down", "--dir", str(tmp_path / "stack")])
    out = capsys.readouterr().out
    assert code == 0 and "nothing to stop" in out and "stopped" not in out
