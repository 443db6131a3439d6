"""A pool of arrays (digits, npy, torchvision sets) has no image files: each queried sample is written
as a PNG under the cycle's folder, listed in the query files, with bytes that depend only on it."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch
from PIL import Image

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.experiment import prepare_data, start_experiment
from tidal.workspace import workspace


def test_each_queried_array_sample_is_a_png_the_query_files_name(tmp_path, data_root):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}", f"data_root={data_root}", "tracking=false",
                                "label_mode=human", "cycles=1"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    pipeline.run_cycle(params, 0)
    cycle_dir = workspace(params).cycle_dir(0)
    with open(cycle_dir / "query.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == params["budget"]
    data = inputs.dataset_for(params)
    for rank, row in enumerate(rows, start=1):
        assert row["path"] == str((cycle_dir / "images" / f"{rank:05d}.png").resolve())
        pixels = np.asarray(Image.open(row["path"]))
        expected = data.pool_images[data.index_of([row["id"]])][0, 0].numpy()  # 1×8×8 digits
        assert pixels.shape == expected.shape and np.array_equal(pixels, expected)
    tasks = json.loads((cycle_dir / "query_labelstudio.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [r["path"] for r in rows]
    first = {p.name: p.read_bytes() for p in sorted((cycle_dir / "images").iterdir())}
    assert len(first) == params["budget"]
    # Exported again (a rerun after a crash): the same files, byte for byte.
    scores = str(cycle_dir / "scores.csv")
    pipeline.export_query(params, 0, scores, [r["id"] for r in rows])
    assert {p.name: p.read_bytes() for p in sorted((cycle_dir / "images").iterdir())} == first


def test_colour_samples_keep_their_three_channels(tmp_path):
    from tidal.labeling.queries import write_query_images

    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    paths = write_query_images(tmp_path, images)
    for path, image in zip(paths, images):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image.permute(1, 2, 0).numpy())
