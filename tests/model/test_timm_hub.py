"""`backbone_weights: timm`: timm's own pretrained weights through its Hugging Face hub cache.

Nothing is downloaded: each test writes a hub cache of its own (the layout huggingface_hub reads,
weights the test makes) and runs offline (`HF_HUB_OFFLINE=1`), in a fresh process, since
huggingface_hub reads its environment once, on import.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tidal.models.timm_backbone import hub_weights

ARCH = "tf_efficientnet_lite0"
TIDAL = Path(sys.executable).parent / "tidal"


def _hub_cache(hf_home: Path, arch: str = ARCH) -> dict[str, torch.Tensor]:
    """A hub cache holding seeded weights for `arch`'s default pretrained tag; the weights."""
    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    torch.manual_seed(7)
    model = timm.create_model(arch, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # unlike any fresh model, so a random start cannot pass
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "snapshots" / revision / "model.safetensors")
    return weights


def _photos(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.jpg")
    return root


def _offline_env(tmp: Path, hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TIDAL_CACHE_DIR": str(tmp / "cache"),
            "PREFECT_HOME": str(tmp / ".prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/m.db"}


def test_timm_weights_come_from_its_hub_cache_and_are_kept_for_later_runs(tmp_path):
    expected = _hub_cache(tmp_path / "hf")
    script = ("import sys; from tidal.models.timm_backbone import hub_weights; "
              f"print(hub_weights({ARCH!r}, sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "weights")], capture_output=True, text=True,
                         env=_offline_env(tmp_path, tmp_path / "hf"), timeout=300)
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip())
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # later runs read the kept file: no hub, no network (the hub cache may be gone)
    (tmp_path / "hf" / "hub").rename(tmp_path / "hf" / "gone")
    assert hub_weights(ARCH, tmp_path / "weights") == path


def test_a_frozen_run_on_timm_weights_reaches_its_first_query(tmp_path):
    """The user's path: `tidal run` with backbone_weights=timm, offline, from a folder of photos."""
    _hub_cache(tmp_path / "hf")
    photos = _photos(tmp_path / "photos")
    run = subprocess.run(
        [str(TIDAL), "run", "--set", "preset=debug", "--set", "dataset=imagefolder", "--set", f"data_root={photos}",
         "--set", "image_size=32", "--set", f"backbone=timm/{ARCH}", "--set", "train.backbone_mode=frozen",
         "--set", "backbone_weights=timm", "--set", "tracking=false", "--set", "device=cpu", "--set", "cycles=1",
         "--set", "initial_size=4", "--set", "budget=2", "--set", "subset_size=null", "--set", "eval_hflip=false",
         "--set", f"runs_dir={tmp_path}/runs", "--set", "experiment=hub"],
        cwd=tmp_path, env=_offline_env(tmp_path, tmp_path / "hf"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "runs" / "hub" / "cycles" / "0" / "query.csv").is_file()
    assert list((tmp_path / "cache" / "weights").glob(f"{ARCH}.*-timm.pth"))


def test_no_hub_and_no_network_is_one_clean_error_before_any_server(tmp_path):
    photos = _photos(tmp_path / "photos")
    run = subprocess.run(
        [str(TIDAL), "run", "--set", "dataset=imagefolder", "--set", f"data_root={photos}", "--set", "image_size=32",
         "--set", f"backbone=timm/{ARCH}", "--set", "train.backbone_mode=frozen", "--set", "backbone_weights=timm",
         "--set", "eval_hflip=false", "--set", f"runs_dir={tmp_path}/runs", "--set", "tracking=false",
         "--set", "initial_size=4", "--set", "budget=2"],
        cwd=tmp_path, env=_offline_env(tmp_path, tmp_path / "empty-hf"), capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert "Traceback" not in output and output.count("\n") == 1, output
    assert "timm could not load the pretrained weights" in output and "backbone_weights=PATH" in output
    assert not (tmp_path / ".prefect").exists() or not any((tmp_path / ".prefect").rglob("*.db")), output


def test_an_architecture_without_pretrained_weights_is_refused(tmp_path):
    def has_weights(arch: str) -> bool:
        cfg = timm.models.get_pretrained_cfg(arch)
        return bool(cfg.hf_hub_id or cfg.url or cfg.file)

    bare = next(a for a in timm.list_models() if not has_weights(a))  # timm would start it from random weights
    with pytest.raises(ValueError, match="no pretrained weights"):
        hub_weights(bare, tmp_path)


def test_a_weights_file_that_does_not_fit_is_one_clean_error_through_the_cli(tmp_path):
    """Not only the hub: a file of another architecture's weights is exit code 2 and one line."""
    photos = _photos(tmp_path / "photos")
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
    run = subprocess.run(
        [str(TIDAL), "run", "--set", "dataset=imagefolder", "--set", f"data_root={photos}", "--set", "image_size=32",
         "--set", f"backbone=timm/{ARCH}", "--set", "train.backbone_mode=finetune", "--set", f"backbone_weights={other}",
         "--set", f"runs_dir={tmp_path}/runs", "--set", "tracking=false", "--set", "initial_size=4", "--set", "budget=2"],
        cwd=tmp_path, env=_offline_env(tmp_path, tmp_path / "empty-hf"), capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output and output.count("\n") == 1, output
    assert output.startswith(f"error: {other}: ") and "missing" in output, output
