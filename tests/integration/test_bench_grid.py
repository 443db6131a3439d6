"""benchmarks/al_curves.py: a 2-strategy × 1-seed grid through the real flow, then a rerun that
recomputes nothing and a re-evaluation of its models (benchmarks/reevaluate.py)."""
from __future__ import annotations

import csv
import json
import shutil

import pytest


def test_grid_writes_cells_and_report_resumes_and_reevaluates(prefect_harness, migrated_mlflow_db, tmp_path, monkeypatch,
                                                  benchmark_script):
    al_curves = benchmark_script("al_curves")
    monkeypatch.chdir(tmp_path)  # nothing may land in the repo
    monkeypatch.setenv("CI", "1")
    out = tmp_path / "results"
    (out / "tiny").mkdir(parents=True)
    shutil.copy(migrated_mlflow_db, out / "tiny" / "mlflow.db")  # skip MLflow's schema migration
    argv = ["--name", "tiny", "--strategies", "random,entropy", "--seeds", "0", "--params", "none",
            "--set", "preset=debug", "--set", f"data_root={tmp_path}/data", "--out", str(out)]

    result = al_curves.main(argv, configure_env=False)
    root = out / "tiny"
    assert sorted(result["ran"]) == ["entropy-s0", "random-s0"] and result["skipped"] == []

    cells = {p.stem: json.loads(p.read_text()) for p in (root / "cells").glob("*.json")}
    assert set(cells) == {"random-s0", "entropy-s0"}
    for name, cell in cells.items():
        assert [r["n_labeled"] for r in cell["rows"]] == [40, 60]  # debug preset: 40 + 20 per cycle
        assert all(0 < r["accuracy"] <= 1 for r in cell["rows"])
        assert cell["wall_s"] > 0 and cell["experiment"] == f"tiny-{name}"
    # Paired seeds: both strategies start from the same initial labels, so cycle 0 is identical.
    assert cells["random-s0"]["rows"][0]["accuracy"] == cells["entropy-s0"]["rows"][0]["accuracy"]

    with open(root / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["strategy", "seed", "cycle", "n_labeled", "accuracy"]
    assert sorted((r["strategy"], r["cycle"]) for r in rows) == [
        ("entropy", "0"), ("entropy", "1"), ("random", "0"), ("random", "1")]
    assert (root / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (root / "README.md").read_text()
    assert "python benchmarks/al_curves.py --name tiny --strategies random,entropy" in readme
    assert "Cells finished: **2 of 2**" in readme
    assert "| random | 1 |" in readme and "| entropy | 1 |" in readme and "AUBC" in readme
    assert "Wall time per cell" in readme
    # MLflow: one experiment per cell in the grid's own store.
    from mlflow import MlflowClient

    names = {e.name for e in MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()}
    assert {"tiny-random-s0", "tiny-entropy-s0"} <= names

    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "cells").glob("*.json")}
    def no_recompute(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(al_curves, "run_cell", no_recompute)
    again = al_curves.main(argv, configure_env=False)
    assert again["ran"] == [] and sorted(again["skipped"]) == ["entropy-s0", "random-s0"]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "cells").glob("*.json")} == mtimes

    # reevaluate.py: the same models under another evaluation setting, checked against the grid.
    reevaluate = benchmark_script("reevaluate")
    with pytest.raises(SystemExit, match="evaluation keys only"):
        reevaluate.main(["--grid", "tiny", "--name", "bad", "--out", str(out), "--set", "train.epochs=3"])
    assert not (out / "bad").exists()
    flip_argv = ["--grid", "tiny", "--name", "tiny-flip", "--out", str(out), "--set", "eval_hflip=true"]
    assert sorted(reevaluate.main(flip_argv)["ran"]) == ["entropy-s0", "random-s0"]
    import torch

    from tidal.config import load_params
    from tidal.evaluate import accuracy
    from tidal.inputs import dataset_for
    from tidal.pipeline import load_models

    changed = 0
    for name, cell in cells.items():
        flipped = json.loads((out / "tiny-flip" / "cells" / f"{name}.json").read_text())
        params = load_params(str(root / "runs" / cell["experiment"] / "params.yaml"))
        data = dataset_for(params)
        for row, new in zip(cell["rows"], flipped["rows"]):
            model, _ = load_models(params, root / "runs" / cell["experiment"] / "cycles" / str(row["cycle"]) / "model.pt")
            expected = accuracy(model, data.test_images, data.test_labels, torch.device("cpu"), hflip=True)
            assert new["accuracy"] == expected and new["n_labeled"] == row["n_labeled"]
            changed += new["accuracy"] != row["accuracy"]
        assert flipped["reevaluated"]["recorded_accuracy"] == [r["accuracy"] for r in cell["rows"]]
        assert flipped["settings"]["eval_hflip"] is True and cell["settings"]["eval_hflip"] is False
    assert changed  # digits are not mirror-symmetric: the mirrored view moves some accuracies
    flip_readme = (out / "tiny-flip" / "README.md").read_text()
    assert "evaluated again with `eval_hflip=true`" in flip_readme and "Cells finished: **2 of 2**" in flip_readme
    assert reevaluate.main(flip_argv)["ran"] == []  # resumed: nothing evaluated twice
    part = ["--grid", "tiny", "--name", "tiny-part", "--out", str(out), "--set", "eval_hflip=true", "--strategies"]
    with pytest.raises(SystemExit, match=r"\['margin'\] have no cells"):
        reevaluate.main([*part, "margin"])
    assert not (out / "tiny-part").exists()
    assert reevaluate.main([*part, "entropy"])["ran"] == ["entropy-s0"]  # a part of the grid, for a second process
    assert "Cells finished: **1 of 2**" in (out / "tiny-part" / "README.md").read_text()
    # A model that is not the one the grid evaluated is refused, naming it.
    ws = root / "runs" / cells["random-s0"]["experiment"] / "cycles"
    shutil.copy(ws / "1" / "model.pt", ws / "0" / "model.pt")
    with pytest.raises(SystemExit, match="not the model it evaluated"):
        reevaluate.main(["--grid", "tiny", "--name", "tiny-flip2", "--out", str(out), "--set", "eval_hflip=true"])
    # The data may move (data_root is where it lives, not what it is) ...
    moved = [a.replace(f"data_root={tmp_path}/data", f"data_root={tmp_path}/elsewhere") for a in argv]
    assert al_curves.main(moved, configure_env=False)["ran"] == []
    # ... but another setting is another grid: refused, naming the way out.
    other = [*argv, "--set", "train.epochs=2"]
    with pytest.raises(SystemExit, match="use another --name"):
        al_curves.main(other, configure_env=False)


def test_ablation_pairs_variants_on_a_validation_split_and_resumes(prefect_harness, tmp_path, monkeypatch,
                                                                   benchmark_script):
    """benchmarks/ablations.py, which chooses TiDAL's defaults: every variant of a seed reports on
    the same held-out validation split (50 images: accuracies are multiples of 1/50, never of the
    test split's size), shares cycle 0's labels, and a detached TD module leaves the cycle-0
    backbone exactly as training alone does; a rerun runs nothing."""
    import math

    ablations = benchmark_script("ablations")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "1")
    out = tmp_path / "abl"
    argv = ["--name", "tiny", "--seeds", "0", "--variants", "random,entropy,tidal-entropy,tidal-entropy-detached", "--params", "none",
            "--set", "preset=debug", "--set", "validation_size=50", "--set", f"data_root={tmp_path}/data",
            "--out", str(out)]
    ablations.main(argv, configure_env=False)

    cells = {v: json.loads((out / "tiny/variants" / v / "cells" / f"{s}-s0.json").read_text())
             for v, s in [("random", "random"), ("entropy", "entropy"), ("tidal-entropy", "tidal-entropy"),
                          ("tidal-entropy-detached", "tidal-entropy")]}
    for cell in cells.values():
        for row in cell["rows"]:
            assert math.isclose(row["accuracy"] * 50, round(row["accuracy"] * 50), abs_tol=1e-4)  # float32
    first = {v: c["rows"][0]["accuracy"] for v, c in cells.items() if v != "tidal-entropy"}
    assert first["random"] == first["entropy"] == first["tidal-entropy-detached"]
    assert all(c["settings"]["validation_size"] == 50 for c in cells.values())
    variant_readme = (out / "tiny/variants/tidal-entropy-detached/README.md").read_text()
    assert "--set train.td_detach=true" in variant_readme
    assert "## Validation accuracy and AUBC" in variant_readme and "mean validation accuracy" in variant_readme

    aubc = {v: sum(r["accuracy"] for r in c["rows"]) / len(c["rows"]) for v, c in cells.items()}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
            for line in (out / "tiny/README.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["entropy"][5] == f"{aubc['entropy'] - aubc['random']:+.4f} (n=1)"  # paired gain over random
    assert rows["tidal-entropy-detached"][8].endswith("+0.0000 (n=1)")  # cycle 0: the backbone as alone
    gain = aubc["tidal-entropy-detached"] - aubc["tidal-entropy"]
    assert rows["tidal-entropy-detached"][7] == f"{gain:+.4f} (n=1)"  # against its defaults, which a change must beat
    assert rows["tidal-entropy"][7] == rows["random"][7] == "–"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "tiny/variants").rglob("cells/*.json")}
    ablations.main(argv, configure_env=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "tiny/variants").rglob("cells/*.json")} == stamps
