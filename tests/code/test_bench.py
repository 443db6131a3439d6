"""The plain entry point for bare GPU boxes, exercised on CPU with tiny settings."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tidal import bench


def test_trial_writes_a_timed_cell(tmp_path: Path, data_root: Path):
    record = bench.run_trial(["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={data_root}",
                              "experiment=b", "strategy=tidal-entropy"], tmp_path / "out", peak_tflops=1.0)
    cell = json.loads((tmp_path / "out/cells/tidal-entropy-s0.json").read_text())
    assert cell == json.loads(json.dumps(record))
    assert [c["n_labeled"] for c in cell["cycles"]] == [40, 60]
    for c in cell["cycles"]:
        assert len(c["epoch_s"]) == 3 and all(t > 0 for t in c["epoch_s"])
        assert c["train_img_s"] > 0 and 0 < c["accuracy"] <= 1
        assert c["mfu"] == c["train_tflops"]  # peak 1 TFLOP/s
    assert cell["train_flops_per_image"] > 0 and cell["device"] == "cpu"


def test_grid_skips_finished_cells(tmp_path: Path, data_root: Path):
    out = tmp_path / "out"
    cells = out / "cells"
    cells.mkdir(parents=True)
    (cells / "random-s0.json").write_text(json.dumps({"strategy": "random", "seed": 0, "wall_s": 1.0, "cycles": [
        {"cycle": 0, "n_labeled": 40, "accuracy": 0.5, "train_s": 1.0, "train_img_s": 1.0, "mfu": None,
         "score_s": 0.1}]}))
    results = bench.run_grid(["random"], [0], ["preset=debug", f"data_root={data_root}"], out)
    assert results == []  # nothing left to run
    rows = (out / "cycles.csv").read_text().splitlines()
    assert rows[0].startswith("strategy,seed,cycle") and rows[1].startswith("random,0,0,40,0.5")


def test_unpack_image_folder_strips_the_top_folder(tmp_path: Path):
    src = tmp_path / "src/cifar10"
    for split in ("train", "test"):
        (src / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / split / "cat" / "0001.jpg")
    tar = tmp_path / "c.tar.gz"
    with tarfile.open(tar, "w:gz") as fh:
        fh.add(src, arcname="cifar10")
    dest = bench.unpack_image_folder(tar, tmp_path / "data")
    assert (dest / "train/cat/0001.jpg").is_file() and (dest / "test/cat/0001.jpg").is_file()
    assert bench.unpack_image_folder(tar, tmp_path / "data") == dest  # second call: already there


def test_grid_runs_missing_cells_in_subprocesses(tmp_path: Path, data_root: Path):
    out = tmp_path / "out"
    results = bench.run_grid(["random", "entropy"], [1], ["preset=debug", f"data_root={data_root}",
                                                          f"runs_dir={tmp_path}/runs"], out, parallel=2)
    assert sorted(results) == ["entropy-s1: done", "random-s1: done"]
    assert {p.name for p in (out / "cells").glob("*.json")} == {"random-s1.json", "entropy-s1.json"}
    assert len((out / "cycles.csv").read_text().splitlines()) == 1 + 2 * 2


def test_trial_with_scoring_shards_selects_what_one_pass_selects(tmp_path: Path, data_root: Path):
    common = ["preset=debug", f"data_root={data_root}", "experiment=b", "strategy=entropy", "train.epochs=1"]
    for shards in (1, 3):
        bench.run_trial([*common, f"runs_dir={tmp_path}/runs{shards}", f"scoring.shards={shards}"],
                        tmp_path / f"out{shards}")
    for cycle in (0, 1):
        one, sharded = (tmp_path / f"runs{n}/b/cycles/{cycle}" for n in (1, 3))
        assert (sharded / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
        # the same query; its PNG paths (digits is an array pool) name each workspace's own folder
        assert ((sharded / "query.csv").read_text().replace(f"{tmp_path}/runs3", "RUNS")
                == (one / "query.csv").read_text().replace(f"{tmp_path}/runs1", "RUNS"))
        assert sorted(p.name for p in (sharded / "shards").iterdir()) == [
            f"{s:04d}-of-0003.json" for s in range(3)]  # scored in shards, then merged
        assert not (one / "shards").exists()


def test_grid_reports_print_commands_a_reader_runs_from_the_repository_root(benchmark_script, monkeypatch):
    """A report's command names paths relative to the repository (an absolute path names one
    machine's checkout) and the thread setting the grid ran under."""
    al_curves = benchmark_script("al_curves")
    inside = str(al_curves.REPO / "benchmarks" / "results" / "ablations" / "x" / "variants")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert al_curves.shown_command("benchmarks/al_curves.py", ["--out", inside, "--set", "data_root=/srv/my data"]) == (
        "OMP_NUM_THREADS=1 python benchmarks/al_curves.py --out benchmarks/results/ablations/x/variants "
        "--set 'data_root=/srv/my data'")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert al_curves.shown_command("benchmarks/ablations.py", ["--out", "/tmp/elsewhere"]) == (
        "python benchmarks/ablations.py --out /tmp/elsewhere")


def test_a_cell_written_before_settings_showed_validation_size_still_reads_as_validation(benchmark_script):
    al_curves = benchmark_script("al_curves")
    assert al_curves._validation_size({"settings": {"validation_size": 50}}) == 50
    assert al_curves._validation_size({"settings": {}, "overrides": ["tracking=false", "validation_size=300"]}) == 300
    assert al_curves._validation_size({"settings": {}, "overrides": ["seed=1"]}) == 0


def test_committed_cells_written_with_test_accuracy_read_as_accuracy(benchmark_script, tmp_path: Path):
    # benchmarks/results/**/cells/*.json predate the rename; new cells say `accuracy`
    al_curves = benchmark_script("al_curves")
    cells = tmp_path / "cells"
    cells.mkdir()
    old = {"strategy": "random", "seed": 0, "rows": [{"strategy": "random", "seed": 0, "cycle": 0, "n_labeled": 40,
                                                       "test_accuracy": 0.5}]}
    new = {"strategy": "entropy", "seed": 0, "rows": [{"strategy": "entropy", "seed": 0, "cycle": 0, "n_labeled": 40,
                                                        "accuracy": 0.6}]}
    (cells / "random-s0.json").write_text(json.dumps(old))
    (cells / "entropy-s0.json").write_text(json.dumps(new))
    rows = {c["strategy"]: c["rows"] for c in al_curves.load_cells(cells)}
    assert rows == {"random": [{"strategy": "random", "seed": 0, "cycle": 0, "n_labeled": 40, "accuracy": 0.5}],
                    "entropy": new["rows"]}
