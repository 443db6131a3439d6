"""Scoring in shards mapped as Prefect tasks on a real local Dask cluster (2 worker processes):
the merged top-k is the single-process `score_step` result, byte for byte."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidal import pipeline
from tidal.config import load_params
from tidal.experiment import prepare_data, start_experiment


@pytest.fixture(scope="module")
def dask_cluster(prefect_harness):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


def _params(tmp_path: Path, *extra: str) -> dict:
    # All unlabeled digits (1,398) in batches of 64: 22 batches, so 3 shards get 8, 8 and 6 of them.
    return load_params(None, ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={tmp_path}/data",
                              "tracking=false", "subset_size=null", "score_batch_size=64", *extra])


def _single_process_scores(params: dict) -> tuple[str, bytes]:
    """Train cycle 0, score it with score_step; move that scores.csv aside and return its bytes."""
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"])
    checkpoint = pipeline.train_step(params, 0)["checkpoint"]
    path = Path(pipeline.score_step(params, 0, checkpoint))
    expected = path.read_bytes()
    path.rename(path.with_name("scores-single-process.csv"))
    return checkpoint, expected


@pytest.mark.parametrize("strategy", ["entropy", "tidal-entropy"])
def test_dask_shards_merge_to_the_single_process_scores(strategy, dask_cluster, tmp_path, monkeypatch):
    from distributed import Client

    from flows.experiment import score_in_shards

    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path, f"strategy={strategy}", f"experiment=dask-{strategy}")
    checkpoint, expected = _single_process_scores(params)
    sharded = _params(tmp_path, f"strategy={strategy}", f"experiment=dask-{strategy}", "scoring.shards=3",
                      "scoring.task_runner=dask", f"scoring.dask_address={dask_cluster.scheduler_address}")
    result = score_in_shards(sharded, 0, checkpoint)
    assert Path(result["scores"]).read_bytes() == expected
    shards = result["shards"]
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 512), (512, 1024), (1024, 1398)]
    # The shards ran in the cluster's worker processes, not here.
    with Client(dask_cluster) as client:
        workers = set(client.run(os.getpid).values())
    assert len(workers) == 2 and os.getpid() not in workers
    assert {s["pid"] for s in shards} <= workers
    assert all(0 < s["peak_rss_mb"] < 2048 for s in shards)


def test_experiment_flow_with_dask_shards_equals_the_unsharded_flow(dask_cluster, tmp_path, monkeypatch):
    """Two cycles through the experiment flow: every cycle's scores.csv and the learning curve match."""
    from flows.experiment import experiment

    monkeypatch.chdir(tmp_path)
    base = ["preset=debug", f"runs_dir={tmp_path}/runs", f"data_root={tmp_path}/data", "tracking=false",
            "strategy=entropy", "subset_size=300", "score_batch_size=32"]
    experiment(params_path=None, overrides=[*base, "experiment=unsharded"])
    experiment(params_path=None, overrides=[*base, "experiment=sharded", "scoring.shards=4",
                                            "scoring.task_runner=dask",
                                            f"scoring.dask_address={dask_cluster.scheduler_address}"])
    runs = tmp_path / "runs"
    for cycle in (0, 1):
        one = (runs / f"unsharded/cycles/{cycle}/scores.csv").read_bytes()
        assert (runs / f"sharded/cycles/{cycle}/scores.csv").read_bytes() == one, cycle
        assert len(list((runs / f"sharded/cycles/{cycle}/shards").glob("*-of-0004.json"))) == 4
    assert (runs / "sharded/learning_curve.csv").read_bytes() == (runs / "unsharded/learning_curve.csv").read_bytes()


def test_flow_refuses_set_strategies_in_shards_before_training(prefect_harness, tmp_path, monkeypatch):
    from flows.experiment import experiment

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'scoring.shards' must be 1 with strategy 'coreset'"):
        experiment(params_path=None, overrides=["preset=debug", f"runs_dir={tmp_path}/runs",
                                                f"data_root={tmp_path}/data", "tracking=false",
                                                "strategy=coreset", "scoring.shards=2"])
    assert not (tmp_path / "runs").exists()
