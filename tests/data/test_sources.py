"""Sources beyond digits: torchvision (no download), imagefolder, manifest, tensor cache, imbalance."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tidal.data.cache as cache_mod
from tidal.data import DataError, load_dataset, materialize
from tidal.data.dataset import UNLABELED
from tidal.data.sources import SOURCES, TORCHVISION
from tidal.data.version import dvc_dir_md5

# ../shared beside the checkout: the development machine and CI both have it at that relative path.
CIFAR_JPG = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ("cat", "dog", "frog")


def _png(path: Path, value: int, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _imagefolder(root: Path, per_class: dict[str, int] | None = None, n_test: int = 2) -> Path:
    per_class = per_class or {c: 4 for c in CLASSES}
    for c_idx, (cls, n) in enumerate(per_class.items()):
        for i in range(n):
            _png(root / "train" / cls / f"{i:04d}.png", 100 * c_idx + i)
        for i in range(n_test):
            _png(root / "test" / cls / f"{i:04d}.png", 1000 + 100 * c_idx + i)
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --- torchvision: never download --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_missing_files_fail_fast_with_path_and_command(tmp_path, monkeypatch, name):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    for call in (lambda: materialize(tmp_path, name), lambda: load_dataset(tmp_path, name)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert str(tmp_path / name) in msg
        assert f"torchvision.datasets.{TORCHVISION[name].cls}('{tmp_path / name}'" in msg
        assert "download=True" in msg
    assert not (tmp_path / name).exists()  # nothing was written either


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, uint8 type 0x08, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_official_splits_from_local_files(tmp_path):
    # MNIST's files carry no md5 check in torchvision, so tiny fake idx files exercise the real reader.
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for stem, n in (("train", 12), ("t10k", 5)):
        _idx(raw / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10)
    assert materialize(tmp_path, "mnist") == tmp_path / "mnist"
    data = load_dataset(tmp_path, "mnist")
    assert data.pool_images.shape == (12, 1, 28, 28) and data.pool_images.dtype == torch.uint8
    assert data.test_images.shape == (5, 1, 28, 28)
    assert data.pool_ids[:2] == ["mnist-train-00000", "mnist-train-00001"]
    assert data.pool_labels.tolist() == [i % 10 for i in range(12)]
    assert data.num_classes == 10


# --- imagefolder ---------------------------------------------------------------------------------

def test_imagefolder_ids_classes_shapes(tmp_path, cache):
    root = _imagefolder(tmp_path / "folder")
    data = load_dataset(root, "imagefolder", cache_dir=cache)
    assert data.classes == sorted(CLASSES)
    assert data.pool_images.shape == (12, 3, 8, 8) and data.pool_images.dtype == torch.uint8
    assert data.test_images.shape == (6, 3, 8, 8)
    assert data.pool_ids[0] == "train/cat/0000" and "train/frog/0003" in data.pool_ids
    assert data.pool_labels[data.index_of(["train/dog/0002"])].item() == data.classes.index("dog")
    expected = np.array(Image.open(root / "train/dog/0002.png")).transpose(2, 0, 1)
    assert torch.equal(data.pool_images[data.index_of(["train/dog/0002"])][0], torch.from_numpy(expected))
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Each pool sample's file, for the annotators: the id is its path under the root, less the suffix.
    assert len(data.pool_files) == len(data.pool_ids)
    for sid, file in zip(data.pool_ids, data.pool_files):
        assert Path(file).is_absolute() and Path(file) == (root / sid).with_suffix(".png").absolute()


def test_imagefolder_grayscale_gives_one_channel(tmp_path, cache):
    root = tmp_path / "gray"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(root / split / cls / "0.png", hash((split, cls)) % 1000, mode="L")
    data = load_dataset(root, "imagefolder", cache_dir=cache)
    assert data.in_channels == 1 and data.pool_images.shape == (2, 1, 8, 8)


def test_imagefolder_missing_split_names_expected_layout(tmp_path, cache):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing \['test'\].*test/<class>"):
        load_dataset(tmp_path, "imagefolder", cache_dir=cache)


def test_imagefolder_truncated_image_is_data_error_naming_the_file(tmp_path, cache):
    root = _imagefolder(tmp_path / "folder")
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match="train/dog/0001.png"):
        load_dataset(root, "imagefolder", cache_dir=cache)


def test_imagefolder_mixed_sizes_is_data_error(tmp_path, cache):
    root = _imagefolder(tmp_path / "folder")
    _png(root / "train" / "frog" / "0009.png", 7, size=16)
    with pytest.raises(DataError, match=r"2 different sizes.*0009\.png.*image_size=224"):
        load_dataset(root, "imagefolder", cache_dir=cache)


def test_imagefolder_is_decoded_once_then_read_from_cache(tmp_path, cache, monkeypatch):
    root = _imagefolder(tmp_path / "folder")
    first = load_dataset(root, "imagefolder", cache_dir=cache)
    assert len(list(cache.glob("imagefolder-*.json"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "_build", no_decode)
    second = load_dataset(root, "imagefolder", cache_dir=cache)
    assert second.pool_ids == first.pool_ids and second.classes == first.classes
    for attr in ("pool_images", "pool_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(second, attr), getattr(first, attr))
    # The pool is read memory-mapped from the cache file, not copied into memory.
    assert second.mapped and isinstance(second.mapped[0], np.memmap)
    # A changed file is a new data version: it is decoded again.
    _png(root / "train" / "cat" / "0000.png", 999)
    monkeypatch.undo()
    third = load_dataset(root, "imagefolder", cache_dir=cache)
    assert not torch.equal(third.pool_images[0], first.pool_images[0])
    assert len(list(cache.glob("imagefolder-*.json"))) == 2


def test_loads_in_one_process_map_one_file_of_the_decoded_pool(tmp_path, cache, monkeypatch):
    """Every step, and every scoring thread, loads the pool: each maps the one cache file (the OS
    shares its pages), none decodes again."""
    from concurrent.futures import ThreadPoolExecutor

    root = _imagefolder(tmp_path / "folder")
    first = load_dataset(root, "imagefolder", cache_dir=cache)
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    with ThreadPoolExecutor(4) as pool:
        loads = list(pool.map(lambda _: load_dataset(root, "imagefolder", cache_dir=cache), range(4)))
    assert {d.mapped[0].filename for d in loads} == {first.mapped[0].filename}
    for data in loads:
        assert torch.equal(data.pool_images, first.pool_images)


def test_cache_dir_defaults_to_env_and_stays_out_of_the_dvc_hash(tmp_path, monkeypatch):
    root = _imagefolder(tmp_path / "folder")
    before = dvc_dir_md5(root)
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset(root, "imagefolder")
    assert list((tmp_path / "env-cache").glob("imagefolder-*.u8"))
    assert dvc_dir_md5(root) == before


def test_imbalance_applies_to_imagefolder_pool_only(tmp_path, cache):
    root = _imagefolder(tmp_path / "folder", per_class={c: 10 for c in CLASSES}, n_test=3)
    balanced = load_dataset(root, "imagefolder", cache_dir=cache)
    data = load_dataset(root, "imagefolder", imbalance_ratio=10, cache_dir=cache)
    counts = np.bincount(data.pool_labels.numpy(), minlength=3).tolist()
    assert counts == [10, 3, 1]  # 10 * (1/10)^(c/2): 10, 3.16, 1
    assert torch.equal(data.test_images, balanced.test_images)
    assert torch.equal(data.test_labels, balanced.test_labels)
    assert set(data.pool_ids) <= set(balanced.pool_ids)
    lookup = balanced.index_of(data.pool_ids)
    assert torch.equal(balanced.pool_images[lookup], data.pool_images[:])
    assert list(data.pool_files) == [balanced.pool_files[i] for i in lookup.tolist()]


def test_real_cifar10_jpegs_load_through_imagefolder(tmp_path, cache):
    # Real data is what this test is for: a missing file fails it, it does not skip.
    assert CIFAR_JPG.is_file(), f"{CIFAR_JPG} is missing: ../shared/data beside the checkout holds it"
    wanted = {}
    with tarfile.open(CIFAR_JPG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[3] in ("0000.jpg", "0001.jpg"):
                member.name = "/".join(parts[1:])  # strip the leading cifar10/
                wanted[member.name] = member
                tar.extract(member, tmp_path / "cifar10", filter="data")
            if len(wanted) == 40:  # 10 classes x 2 splits x 2 images
                break
    data = load_dataset(tmp_path / "cifar10", "imagefolder", cache_dir=cache)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"]
    assert data.pool_images.shape == (20, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert data.pool_ids[:2] == ["train/airplane/0000", "train/airplane/0001"]
    assert data.pool_labels.tolist() == [c for c in range(10) for _ in range(2)]


# --- manifest ---------------------------------------------------------------------------------------

def _manifest(root: Path, rows: list[str], classes=CLASSES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def manifest_root(tmp_path) -> Path:
    root = tmp_path / "m"
    for i in range(6):
        _png(root / "img" / f"{i}.png", i)
    return _manifest(root, ["img/0.png,cat,train", "img/1.png,dog,train", "img/2.png,,train",
                            "img/3.png,cat,test", "img/4.png,frog,train", "img/5.png,dog,test"])


def test_manifest_loads_pool_with_unlabeled_and_test_split(manifest_root, cache):
    data = load_dataset(manifest_root, "manifest", cache_dir=cache)
    assert data.classes == list(CLASSES)
    assert data.pool_ids == ["img/0", "img/1", "img/2", "img/4"]
    assert data.pool_labels.tolist() == [0, 1, UNLABELED, 2]
    assert data.test_labels.tolist() == [0, 1]
    assert data.pool_images.shape == (4, 3, 8, 8) and data.test_images.shape == (2, 3, 8, 8)
    expected = np.array(Image.open(manifest_root / "img/4.png")).transpose(2, 0, 1)
    assert torch.equal(data.pool_images[3], torch.from_numpy(expected))
    assert list(data.pool_files) == [str((manifest_root / f"img/{i}.png").absolute()) for i in (0, 1, 2, 4)]


def test_manifest_second_load_uses_cache(manifest_root, cache, monkeypatch):
    first = load_dataset(manifest_root, "manifest", cache_dir=cache)
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    second = load_dataset(manifest_root, "manifest", cache_dir=cache)
    assert torch.equal(first.pool_images, second.pool_images) and torch.equal(first.test_images, second.test_images)


@pytest.mark.parametrize("row, text", [
    ("../outside.png,cat,train", "'../outside.png'"),
    ("img/../../outside.png,cat,train", "'img/../../outside.png'"),
    ("/etc/passwd,cat,train", "'/etc/passwd'"),
    ("img/missing.png,cat,train", "'img/missing.png': image file not found"),
    ("img/0.png,horse,train", "label 'horse' is not one of the classes"),
    ("img/0.png,,test", "a test sample needs a label"),
    ("img/0.png,cat,valid", "split must be one of"),
])
def test_manifest_bad_row_names_line_and_path(manifest_root, cache, row, text):
    _png(manifest_root.parent / "outside.png", 1)
    lines = (manifest_root / "manifest.csv").read_text().splitlines()
    lines.insert(3, row)  # becomes line 4 of the file
    (manifest_root / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(manifest_root, "manifest", cache_dir=cache)
    msg = str(err.value)
    assert "manifest.csv line 4" in msg and text in msg


def test_manifest_follows_a_symlinked_folder_inside_the_root(manifest_root, tmp_path, cache):
    """Images kept on another disk, reached through a link inside data_root, load; the data
    version hashes the linked files, so changing one changes it."""
    from tidal.data.version import pool_version

    other_disk = tmp_path / "other-disk"
    for i in range(2):
        _png(other_disk / f"{i}.png", 10 + i)
    (manifest_root / "linked").symlink_to(other_disk, target_is_directory=True)
    lines = (manifest_root / "manifest.csv").read_text().splitlines() + ["linked/0.png,cat,train",
                                                                         "linked/1.png,dog,test"]
    (manifest_root / "manifest.csv").write_text("\n".join(lines) + "\n")
    data = load_dataset(manifest_root, "manifest", cache_dir=cache)
    assert "linked/0" in data.pool_ids and len(data.test_labels) == 3
    before = pool_version(manifest_root)
    _png(other_disk / "0.png", 99)
    assert pool_version(manifest_root) != before


def test_manifest_truncated_image_names_line_and_path(manifest_root, cache):
    bad = manifest_root / "img" / "4.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=r"1 of 6 image files.*manifest.csv line 6, path 'img/4.png': (not an image|cannot decode)"):
        load_dataset(manifest_root, "manifest", cache_dir=cache)


def test_manifest_imbalance_needs_labels_for_every_pool_sample(manifest_root, cache):
    with pytest.raises(DataError, match="unlabeled"):
        load_dataset(manifest_root, "manifest", imbalance_ratio=10, cache_dir=cache)


def test_manifest_imbalance_pool_only(tmp_path, cache):
    root = tmp_path / "m"
    rows = []
    for c_idx, cls in enumerate(CLASSES):
        for i in range(10):
            _png(root / f"{cls}{i}.png", 10 * c_idx + i)
            rows.append(f"{cls}{i}.png,{cls},{'test' if i < 2 else 'train'}")
    _manifest(root, rows)
    data = load_dataset(root, "manifest", imbalance_ratio=8, cache_dir=cache)
    assert np.bincount(data.pool_labels.numpy()).tolist() == [8, 2, 1]  # 8 * (1/8)^(c/2)
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_every_source_is_registered():
    assert {"digits", "cifar10", "cifar100", "fashion-mnist", "mnist", "svhn", "imagefolder",
            "manifest"} <= set(SOURCES)


@pytest.mark.parametrize("preset, dataset, backbone, budget", [
    ("paper-cifar10", "cifar10", "resnet18", 1000),
    ("paper-cifar100", "cifar100", "resnet18", 2000),
    ("paper-cifar10-imb100", "cifar10", "resnet18", 500),
    ("cpu-cifar10", "imagefolder", "small-cnn", 200),
])
def test_data_presets_validate_and_keep_data_root_out_of_the_pinned_data_dir(preset, dataset, backbone, budget):
    from tidal.config import load_params

    params = load_params(None, [f"preset={preset}"])
    assert (params["dataset"], params["backbone"], params["budget"]) == (dataset, backbone, budget)
    assert params["initial_size"] == budget
    assert params["train"]["crop_pad"] == 4 and params["train"]["hflip"] is True
    assert not Path(params["data_root"]).is_relative_to("data")  # data/ is pinned by data.dvc
    assert load_params(None, [f"preset={preset}", "budget=7", "subset_size=7"])["budget"] == 7


def test_query_export_names_the_image_file_of_each_queried_sample(tmp_path, cache, monkeypatch):
    """Annotators of an image-folder pool get each queried image's file (query.csv, .jsonl, Label Studio)."""
    import csv
    import json

    from tidal import pipeline
    from tidal.config import load_params
    from tidal.experiment import prepare_data, start_experiment

    monkeypatch.setenv("TIDAL_CACHE_DIR", str(cache))
    root = _imagefolder(tmp_path / "folder", per_class={c: 12 for c in CLASSES})
    params = load_params(None, ["preset=debug", "dataset=imagefolder", f"data_root={root}", f"runs_dir={tmp_path}/runs",
                                "tracking=false", "initial_size=6", "budget=4", "subset_size=20",
                                "train.epochs=1", "train.batch_size=4", "train.milestones=[1]"])
    start_experiment(params, prepare_data(params)["data_version"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    scores = pipeline.score_step(params, 0, checkpoint)
    ids = pipeline.select_step(scores, params["budget"])
    query = Path(pipeline.export_query(params, 0, scores, ids))
    rows = list(csv.DictReader(query.open()))
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert Path(r["path"]) == (root / r["id"]).with_suffix(".png").absolute() and Path(r["path"]).is_file()
    tasks = json.loads((query.parent / "query_labelstudio.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [r["path"] for r in rows]


def test_oracle_mode_refuses_a_pool_with_unlabeled_rows_before_any_state(manifest_root, tmp_path, cache, monkeypatch):
    """Oracle mode would query an unlabeled row and fail at training; it is refused up front."""
    from tidal.config import load_params
    from tidal.experiment import prepare_data, start_experiment

    monkeypatch.setenv("TIDAL_CACHE_DIR", str(cache))
    overrides = ["preset=debug", "dataset=manifest", f"data_root={manifest_root}", f"runs_dir={tmp_path}/runs",
                 "tracking=false", "initial_size=2"]
    oracle = load_params(None, [*overrides, "label_mode=oracle"])
    version = prepare_data(oracle)["data_version"]
    with pytest.raises(DataError, match=r"1 pool sample\(s\) .* have none \(e.g. \['img/2'\]\); use label_mode=human"):
        start_experiment(oracle, version)
    assert not (tmp_path / "runs").exists()
    human = start_experiment(load_params(None, [*overrides, "label_mode=human"]), version)
    assert "img/2" not in human["labeled"] and len(human["labeled"]) == 2
