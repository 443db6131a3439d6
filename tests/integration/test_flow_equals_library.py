"""The Prefect flow (tracking off) and the library's `pipeline.run_cycle` are one cycle: the default
experiment run both ways ends in the same state, curve and queries, byte for byte.

The default params (digits, small-cnn, tidal-entropy, 100 + 100 labels, the default recipe) with
2 of its 5 cycles, to keep the suite's time down; each cycle is the default's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tidal import pipeline
from tidal.config import load_params
from tidal.experiment import prepare_data, start_experiment

# What the flow adds to a history record and the library has no value for.
TRACKING_KEYS = {"mlflow_run_id", "prefect_flow_run_id"}


def _overrides(root: Path, data_root: Path) -> list[str]:
    return ["cycles=2", "tracking=false", "experiment=same", f"runs_dir={root}/runs", f"data_root={data_root}"]


def _end_state(root: Path) -> dict:
    """state.json and the workspace's csv/jsonl/Label Studio files, with `root` written as ROOT;
    state.json without the flow's tracking ids and the `--set` overrides the CLI records."""
    ws = root / "runs/same"
    state = json.loads((ws / "state.json").read_text().replace(str(root), "ROOT"))
    state["history"] = [{k: v for k, v in h.items() if k not in TRACKING_KEYS} for h in state["history"]]
    state.pop("overrides")
    files = {str(p.relative_to(ws)): p.read_bytes().replace(str(root).encode(), b"ROOT")
             for p in sorted(ws.rglob("*"))
             if p.is_file() and (p.suffix in {".csv", ".jsonl"} or p.name == "labelstudio.json")}
    return {"state": state, "files": files}


def test_the_flow_and_the_library_end_the_default_experiment_alike(prefect_harness, data_root, tmp_path):
    from flows.experiment import experiment

    data_root = Path(data_root)
    flow_history = experiment(params_path=None, overrides=_overrides(tmp_path / "flow", data_root))

    params = load_params(None, _overrides(tmp_path / "lib", data_root))
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    records = [pipeline.run_cycle(params, cycle) for cycle in range(params["cycles"])]

    assert params["strategy"] == "tidal-entropy" and params["dataset"] == "digits"  # the default experiment
    assert [r["accuracy"] for r in records] == [h["accuracy"] for h in flow_history]
    by_flow, by_library = _end_state(tmp_path / "flow"), _end_state(tmp_path / "lib")
    assert by_flow["state"]["history"] == by_library["state"]["history"]
    assert by_flow["state"] == by_library["state"]
    assert sorted(by_flow["files"]) == sorted(by_library["files"])
    assert "cycles/1/query.csv" in by_flow["files"] and "learning_curve.csv" in by_flow["files"]
    for name, content in by_flow["files"].items():
        assert content == by_library["files"][name], name

    for cycle in range(2):
        a = torch.load(tmp_path / f"flow/runs/same/cycles/{cycle}/model.pt", weights_only=True)
        b = torch.load(tmp_path / f"lib/runs/same/cycles/{cycle}/model.pt", weights_only=True)
        assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
        assert all(torch.equal(a["td_module"][k], b["td_module"][k]) for k in a["td_module"])
    assert records[-1]["seconds"].keys() == {"train", "evaluate", "score", "commit"}
