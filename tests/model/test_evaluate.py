"""eval_hflip: accuracy on each image and its mirror, without touching training or selection."""
from __future__ import annotations

import csv
import json

import torch
from torch import nn

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.evaluate import accuracy, predict_logits
from tidal.experiment import prepare_data, start_experiment
from tidal.workspace import workspace

CPU = torch.device("cpu")


class HalvesModel(nn.Module):
    """Class 0's logit is the left half's mean brightness, class 1's the right half's."""

    def forward(self, x: torch.Tensor):
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1), []


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    images = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    images[:3, ..., :2] = 200  # bright left half: class 0
    images[3:, ..., 2:] = 200  # bright right half: class 1
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    model = HalvesModel()
    plain = predict_logits(model, images, CPU, batch_size=4)
    mirrored = predict_logits(model, images.flip(-1), CPU, batch_size=4)
    both = predict_logits(model, images, CPU, batch_size=4, hflip=True)
    torch.testing.assert_close(both, 0.5 * (plain + mirrored))
    assert accuracy(model, images, labels, CPU) == 1.0
    # its mirror swaps the halves: the mean logits tie, and argmax takes class 0 for every image
    assert accuracy(model, images, labels, CPU, hflip=True) == 0.5


def _experiment(tmp_path, data_root, name: str, eval_hflip: bool):
    params = load_params(None, ["preset=debug", f"runs_dir={tmp_path}/{name}", f"data_root={data_root}",
                                "tracking=false", f"eval_hflip={str(eval_hflip).lower()}"])
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    pipeline.run_cycle(params, 0)
    return params, workspace(params).cycle_dir(0)


def test_eval_hflip_changes_the_reported_accuracy_only(tmp_path, data_root, capsys):
    plain_params, plain = _experiment(tmp_path, data_root, "plain", False)
    flip_params, flip = _experiment(tmp_path, data_root, "flip", True)
    # training and selection are the same: the weights and scores byte for byte
    assert (plain / "scores.csv").read_bytes() == (flip / "scores.csv").read_bytes()
    a, b = (torch.load(d / "model.pt", weights_only=True)["backbone"] for d in (plain, flip))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain_eval, flip_eval = (json.loads((d / "eval.json").read_text()) for d in (plain, flip))
    assert (plain_eval["eval_hflip"], flip_eval["eval_hflip"]) == (False, True)
    data = inputs.dataset_for(flip_params)
    backbone, _ = pipeline.load_models(flip_params, str(flip / "model.pt"), data)
    assert flip_eval["accuracy"] == accuracy(backbone, data.test_images, data.test_labels, CPU, hflip=True)
    assert plain_eval["accuracy"] == accuracy(backbone, data.test_images, data.test_labels, CPU)
    assert flip_eval["accuracy"] != plain_eval["accuracy"]  # digits are not mirror-symmetric
    # the annotators' suggested labels and confidences are the model's predictions as evaluated
    with open(flip / "query.csv") as fh:
        rows = list(csv.DictReader(fh))
    queried = data.pool_images[data.index_of([r["id"] for r in rows])]
    both, one = (predict_logits(backbone, queried, CPU, hflip=h).softmax(1) for h in (True, False))
    assert [int(r["suggested_label"]) for r in rows] == both.argmax(1).tolist()
    tasks = json.loads((flip / "query_labelstudio.json").read_text())
    shown = torch.tensor([task["predictions"][0]["score"] for task in tasks])
    torch.testing.assert_close(shown, both.max(1).values)
    assert not torch.allclose(shown, one.max(1).values)  # not the one-view confidences
    # `tidal status` says how the accuracy was measured
    from tidal.cli import main as tidal_main

    capsys.readouterr()
    for name, flag in (("flip", "true"), ("plain", "false")):
        overrides = ["preset=debug", f"runs_dir={tmp_path}/{name}", f"data_root={data_root}", "tracking=false",
                     f"eval_hflip={flag}"]
        assert tidal_main(["status", *sum((["--set", o] for o in overrides), [])]) == 0
        assert ("each image and its mirror" in capsys.readouterr().out) == (flag == "true")
