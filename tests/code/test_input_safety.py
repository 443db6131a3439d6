"""Files that annotators, a Label Studio under another account, or a second user of the caches
read are created with the mode the umask gives (issue #31, item 6): the decoded-image cache, a
frozen backbone's features and the query images."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

UMASK = 0o027  # group may read, others nothing: neither 0600 (mkstemp's) nor 0644


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield 0o666 & ~UMASK
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def test_decoded_image_cache_files_take_the_umask(tmp_path, umask):
    from tidal.data.cache import decoded_pool

    files = []
    for i in range(3):
        path = tmp_path / "photos" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4), (i * 60, 0, 0)).save(path)
        files.append(str(path))
    (tmp_path / "photos" / "bad.png").write_bytes(b"not an image")
    files.append(str(tmp_path / "photos" / "bad.png"))
    decoded_pool("imagefolder", files, [[f, 1, 1] for f in files], lambda i: files[i],
                 directory=tmp_path / "cache", workers=1)
    modes = _modes(tmp_path / "cache")
    assert len(modes) >= 3 and set(modes.values()) == {umask}, modes  # .u8, .json, .bad.csv


class _Backbone(nn.Module):
    stage_channels = [2]

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None], [x[:, :2]]


def test_frozen_features_take_the_umask(tmp_path, umask):
    from tidal.features import extract_features

    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    extract_features(_Backbone, images, "k", torch.device("cpu"), batch_size=2, directory=tmp_path)
    modes = _modes(tmp_path / "features")
    assert sorted(modes) == ["k.f32", "k.json"] and set(modes.values()) == {umask}, modes


def test_query_images_take_the_umask(tmp_path, umask):
    from tidal.labeling.queries import export_query_files, write_query_images

    write_query_images(tmp_path, torch.zeros((2, 1, 4, 4), dtype=torch.uint8))
    export_query_files(tmp_path, "e", 0, "e-cycle0", [{"id": "a", "score": 1.0, "rank": 1}], ["x", "y"])
    modes = _modes(tmp_path)
    assert len(modes) == 6 and set(modes.values()) == {umask}, modes
