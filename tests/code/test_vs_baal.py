"""benchmarks/vs_baal.py: both sides run the same experiment, and the report says what was measured.

Most tests need no baal (it is only in the `bench` extra); the last one runs both libraries for
one tiny cycle when baal is importable and is skipped otherwise.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tidal import inputs, pipeline
from tidal.config import flatten, load_params
from tidal.experiment import initial_labeled
from tidal.train import augment, normalize, to_float

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import vs_baal  # noqa: E402

TINY = ["cycles=1", "train.epochs=1"]




def test_the_experiment_is_params_yaml_with_entropy():
    ours = flatten(vs_baal.experiment_params(0, []))
    yaml = flatten(load_params(REPO / "params.yaml"))
    # run_trial starts from the built-in defaults, not params.yaml: they must define the same experiment.
    for key in ("dataset", "cycles", "initial_size", "budget", "subset_size", "backbone", "imbalance_ratio",
                "dropout", "train.epochs", "train.batch_size", "train.lr", "train.momentum",
                "train.weight_decay", "train.milestones", "train.crop_pad", "train.hflip"):
        assert ours[key] == yaml[key], key
    assert ours["strategy"] == "entropy" and ours["tracking"] is False and ours["device"] == "cpu"


def test_ours_starts_from_the_ids_baal_is_given_and_scores_subset_size(tmp_path: Path, data_root: Path):
    overrides = [f"data_root={data_root}", *TINY]
    params = vs_baal.experiment_params(3, overrides)
    result = vs_baal.run_ours(params, overrides, tmp_path, "ours-t")
    expected = initial_labeled(params, inputs.dataset_for(params))
    assert len(expected) == params["initial_size"] == 100
    assert result["initial_ids"] == expected
    assert expected != initial_labeled(vs_baal.experiment_params(4, overrides), inputs.dataset_for(params))
    [cycle] = result["cycles"]
    assert cycle["n_labeled"] == 100 and cycle["n_candidates"] == params["subset_size"] == 500
    assert cycle["other_s"] >= 0 and cycle["cycle_s"] >= cycle["train_s"] + cycle["eval_s"] + cycle["score_s"]
    assert 0 < cycle["test_accuracy"] <= 1
    assert pipeline.candidate_positions.__name__ == "candidate_positions"  # the counting wrapper is gone again


def test_baal_transforms_do_what_our_trainer_does(data_root: Path):
    params = vs_baal.experiment_params(0, [f"data_root={data_root}"])
    data = inputs.dataset_for(params)
    train_tf, test_tf = vs_baal.baal_transforms(params, data)
    images = data.pool_images[:20]
    for img in images:
        assert torch.allclose(test_tf(img), normalize(to_float(img[None]))[0])
    # Every output of baal's random crop is one of the 9 crops our trainer can draw, and over a few
    # draws it is not always the same one (the crop is random, with zero padding before normalizing).
    padded = torch.nn.functional.pad(to_float(images), (1, 1, 1, 1))
    h, w = images.shape[2:]
    crops = [normalize(padded[:, :, dy:dy + h, dx:dx + w]) for dy in range(3) for dx in range(3)]
    torch.manual_seed(0)
    for i, img in enumerate(images):
        picks = set()
        for _ in range(10):
            out = train_tf(img)
            picks.add(next(k for k, crop in enumerate(crops) if torch.allclose(out, crop[i])))
        assert len(picks) > 1, i
    # Ours draws from the same 9.
    ours = normalize(augment(to_float(images), 1, False, torch.Generator().manual_seed(0)))
    assert all(any(torch.allclose(ours[i], crop[i]) for crop in crops) for i in range(len(images)))


class FakeWrapper:
    def __init__(self) -> None:
        self.args = type("Args", (), {"epoch": 0})()
        self.calls: list[tuple[int, float]] = []
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)

    def train_on_dataset(self, dataset: Any) -> None:
        self.calls.append((self.args.epoch, self.optimizer.param_groups[0]["lr"]))


def test_baal_training_follows_the_milestone_schedule():
    w = FakeWrapper()
    vs_baal._train_with_milestones(w, w.optimizer, None, 40, [30])
    assert [e for e, _ in w.calls] == [30, 10]
    assert [lr for _, lr in w.calls] == pytest.approx([0.05, 0.005])
    w = FakeWrapper()
    vs_baal._train_with_milestones(w, w.optimizer, None, 5, [30])  # a milestone past the end: one segment
    assert w.calls == [(5, 0.05)]


def _fake_runner(library: str, order: list[str], ids: list[str] | None = None) -> vs_baal.Runner:
    def run(params: dict, overrides: list[str], tag: str) -> dict:
        order.append(f"{library}:{tag}")
        scale = 2.0 if library == "baal" else 1.0
        cycles = [{"cycle": k, "n_labeled": 100 * (k + 1), "test_accuracy": 0.5 + 0.1 * k, "cycle_s": scale * (k + 1),
                   "train_s": scale * k, "eval_s": 0.1, "score_s": 0.2, "other_s": 0.3, "n_candidates": 500}
                  for k in range(2)]
        return {"library": library, "total_s": 3 * scale, "initial_ids": ids or [f"s{params['seed']}"],
                "cycles": cycles}
    return run


def test_rounds_alternate_and_the_report_gives_the_ratio(tmp_path: Path):
    order: list[str] = []
    runners = {lib: _fake_runner(lib, order) for lib in vs_baal.LIBRARIES}
    result = vs_baal.measure(3, ["cycles=2"], tmp_path, torch.get_num_threads(), runners=runners)
    assert order == ["ours:warm-up", "baal:warm-up", "ours:r0", "baal:r0", "baal:r1", "ours:r1", "ours:r2", "baal:r2"]
    assert [row["ratio"] for row in result["summary"]] == [2.0, 2.0]
    result["epoch_profile"] = {"n_labeled": 500, "reps": 3, "ours_model_s": 1.0, "baal_model_s": 1.5,
                               "median_s": {"ours_input_s": 0.1, "baal_input_s": 0.5, "ours_epoch_s": 1.1,
                                            "baal_epoch_s": 2.0}}
    vs_baal.write_report(tmp_path / "out", result, "python benchmarks/vs_baal.py --rounds 3")
    readme = (tmp_path / "out/README.md").read_text()
    assert "python benchmarks/vs_baal.py --rounds 3" in readme
    assert "| 1 | 200 | 2.00 | 4.00 | 2.00× | 0.6000 | 0.6000 |" in readme
    assert "set_num_threads" in readme and "shared" in readme
    assert "| baal / ours | 5.0× | 1.82× | 1.50× |" in readme
    assert json.loads((tmp_path / "out/results.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "out/vs_baal.png").stat().st_size > 1000


def test_different_initial_sets_are_refused(tmp_path: Path):
    order: list[str] = []
    runners = {"ours": _fake_runner("ours", order), "baal": _fake_runner("baal", order, ids=["other"])}
    with pytest.raises(RuntimeError, match="different labeled sets"):
        vs_baal.measure(1, [], tmp_path, torch.get_num_threads(), runners=runners)


def test_missing_baal_names_the_install_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "baal", None)  # `import baal` now raises ImportError
    with pytest.raises(ImportError, match="make bench-deps"):
        vs_baal.import_baal()


def test_both_libraries_run_one_tiny_cycle(tmp_path: Path, data_root: Path):
    # baal is the `bench` extra, which `make test` installs (make bench-deps): missing, this fails.
    vs_baal.import_baal()
    result = vs_baal.measure(1, [f"data_root={data_root}", *TINY], tmp_path, torch.get_num_threads())
    ours, baal = result["runs"]
    assert (ours["library"], baal["library"]) == ("ours", "baal")
    assert ours["initial_ids"] == baal["initial_ids"]
    for run in (ours, baal):
        [cycle] = run["cycles"]
        assert cycle["n_labeled"] == 100 and cycle["n_candidates"] == 500
        assert 0 < cycle["test_accuracy"] <= 1 and cycle["cycle_s"] > 0
    profile = vs_baal.profile_epoch(vs_baal.experiment_params(0, [f"data_root={data_root}", *TINY]), reps=1)
    assert profile["n_labeled"] == 100
    assert all(len(v) == 1 and v[0] > 0 for v in profile["seconds"].values())
