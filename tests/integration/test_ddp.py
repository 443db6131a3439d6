"""Data-parallel training for real: torchrun, gloo, 2 CPU processes on 127.0.0.1, against one process.

Tolerances (measured on this machine, torch 2.14.1 CPU, 2 epochs, 75 digits; the values are
printed by `pytest -s tests/integration/test_ddp.py -k two_ranks_match`):
- Without BatchNorm, 2 ranks equal one process up to float rounding: max |Δ| measured 3e-8 for
  parameters, 1.5e-8 for the TD record, 4e-7 for the epoch losses; asserted < 1e-5. This checks
  sharding, augmentation, loss scaling, TD record sync and metric reduction exactly.
- With BatchNorm (the real small-cnn), normalized with the global batch's statistics on CPU by
  tidal.train.GlobalBatchNorm2d (nn.SyncBatchNorm has no CPU kernels in torch 2.14): measured
  6e-8 for the backbone's parameters, 1.5e-8 for the TD module's, 7.5e-8 for the TD record,
  2e-7 for the epoch losses; asserted < 1e-5 too. (With per-rank BatchNorm they were 6.9e-3,
  5.3e-4 and 2.6e-2.) A run with another data seed lies beyond the tolerance: the control.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker
from tidal import pipeline
from tidal.config import load_params
from tidal.workspace import read_json

WORKER = Path(__file__).with_name("ddp_worker.py")
EXACT = 1e-5
# case: (backbone params, aux module params, TD record); see the module docstring.
TOLERANCE = {"td": (EXACT, EXACT, EXACT), "td-nobn": (EXACT, EXACT, EXACT), "lloss-nobn": (EXACT, EXACT, None)}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", **extra}
    for key in ("TIDAL_FAILPOINT", "TIDAL_FAILPOINT_ACTION"):
        if key not in extra:
            env.pop(key, None)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run with a hard time limit; on expiry kill the whole process group (torchrun and its ranks)
    and fail the test: the limit is what tells a hang from a run that ends."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[2:4]} did not end within {timeout} s (a hang):\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], buffers: bool = False) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point() and ("running_" in k) == buffers]
    assert keys and set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in keys)


# --- 1. two ranks against one process, through train_cycle ---------------------------------------

@pytest.fixture(scope="module")
def two_ranks(data_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "ranks.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(data_root), str(out)]
    run = _run(cmd, _env(), timeout=120)
    assert run.returncode == 0, run.stdout[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", list(ddp_worker.CASES))
def test_two_ranks_match_one_process(two_ranks, data_root, case):
    torch.use_deterministic_algorithms(True)  # as on the ranks; the shared fixture restores it
    one, ddp = ddp_worker.train_case(case, str(data_root)), two_ranks[case]
    tol_backbone, tol_aux, tol_td = TOLERANCE[case]
    d_backbone, d_aux = _max_diff(one["backbone"], ddp["backbone"]), _max_diff(one["aux"], ddp["aux"])
    d_loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(one["history"], ddp["history"]))
    print(f"\n{case}: max |Δ| backbone {d_backbone:.2g}, aux {d_aux:.2g}, "
          f"TD record {(one['td_mean'] - ddp['td_mean']).abs().max().item() if tol_td else 0:.2g}, loss {d_loss:.2g}")
    assert d_backbone < tol_backbone, f"{case}: backbone max |Δ| {d_backbone:.3g} >= {tol_backbone:g}"
    assert d_aux < tol_aux, f"{case}: aux module max |Δ| {d_aux:.3g} >= {tol_aux:g}"
    if tol_td is not None:
        d_td = (one["td_mean"] - ddp["td_mean"]).abs().max().item()
        assert d_td < tol_td, f"{case}: TD record max |Δ| {d_td:.3g} >= {tol_td:g}"
        assert torch.equal(one["td_count"], ddp["td_count"])  # each sample counted once per epoch
    assert [r.keys() for r in one["history"]] == [r.keys() for r in ddp["history"]]
    for a, b in zip(one["history"], ddp["history"]):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"]
        if tol_backbone == EXACT:  # the global epoch metrics, all-reduced over the ranks
            assert max(abs(a[k] - b[k]) for k in a) < EXACT, (a, b)
    if case == "td":
        # The control: another data seed lies beyond every tolerance, so the check can fail.
        other = ddp_worker.train_case(case, str(data_root), seed=4)
        assert _max_diff(one["backbone"], other["backbone"]) > tol_backbone
        assert (one["td_mean"] - other["td_mean"]).abs().max().item() > tol_td


# --- the train step: torchrun from train_step, failures, resume -----------------------------------

def _overrides(root: Path, data_root: Path, *extra: str) -> list[str]:
    return ["preset=debug", f"runs_dir={root}", f"data_root={data_root}", "tracking=false", "device=cpu",
            "experiment=ddp", *extra]


def _workspace(root: Path, data_root: Path, *extra: str) -> dict:
    params = load_params(None, _overrides(root, data_root, *extra))
    prepared = pipeline.prepare_data(params)
    pipeline.start_experiment(params, prepared["data_version"])
    return params


TRAIN_STEP = """
import sys
from tidal import pipeline
from tidal.config import load_params
from tidal.workspace import read_json
try:
    pipeline.train_step(load_params(None, sys.argv[1:]), 0)
except Exception as err:
    print(f"TRAIN_STEP_ERROR {type(err).__name__}: {err}")
    sys.exit(3)
"""


def _train_step_in_subprocess(root: Path, data_root: Path, env: dict, timeout: float, *extra: str):
    return _run([sys.executable, "-c", TRAIN_STEP, *_overrides(root, data_root, *extra)], env, timeout)


def test_killed_rank_ends_the_run_with_a_clear_error_then_rerun_trains(data_root, tmp_path, monkeypatch):
    params = _workspace(tmp_path, data_root, "distributed.nproc_per_node=2")
    out_dir = pipeline.workspace(params).cycle_dir(0)
    killed = _train_step_in_subprocess(tmp_path, data_root, _env(TIDAL_FAILPOINT="train_ddp:rank1:epoch"),
                                     120, "distributed.nproc_per_node=2")
    assert killed.returncode == 3, killed.stdout[-3000:]
    assert ("TRAIN_STEP_ERROR DistributedTrainingFailed: distributed training of cycle 0 failed: "
            "rank 1 failed with exit code -9 (SIGKILL)") in killed.stdout, killed.stdout[-3000:]
    assert not (out_dir / "model.pt").exists() and not (out_dir / "train_history.json").exists()
    # The step stays resumable: the rerun trains (in this process, torchrun again) and writes both files.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = pipeline.train_step(params, 0)
    assert result["resumed"] is False
    assert (out_dir / "model.pt").is_file() and (out_dir / "train_history.json").is_file()


def test_hanging_rank_times_out_instead_of_hanging(data_root, tmp_path):
    _workspace(tmp_path, data_root, "distributed.nproc_per_node=2")
    env = _env(TIDAL_FAILPOINT="train_ddp:rank1:epoch", TIDAL_FAILPOINT_ACTION="hang")
    hung = _train_step_in_subprocess(tmp_path, data_root, env, 120, "distributed.nproc_per_node=2",
                                     "distributed.timeout_s=5")
    assert hung.returncode == 3, hung.stdout[-3000:]
    # Rank 1 stopped answering; rank 0's next collective timed out after timeout_s and ended the run.
    assert "TRAIN_STEP_ERROR DistributedTrainingFailed" in hung.stdout, hung.stdout[-3000:]
    assert "rank 0 failed with exit code 1" in hung.stdout and "Timed out" in hung.stdout, hung.stdout[-3000:]
    assert not (tmp_path / "ddp/cycles/0/model.pt").exists()


def test_train_step_on_two_processes_writes_what_one_process_writes(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = _workspace(tmp_path / "one", data_root)
    two = _workspace(tmp_path / "two", data_root, "distributed.nproc_per_node=2")
    single = pipeline.train_step(one, 0)
    seen: list[dict] = []
    ddp = pipeline.train_step(two, 0, on_epoch=seen.append)
    assert set(ddp) == set(single) and ddp["resumed"] is False

    def files(params: dict) -> list[str]:  # no temp files or partial writes left behind
        return sorted(p.name for p in pipeline.workspace(params).cycle_dir(0).iterdir())

    assert files(two) == files(one) == ["model.pt", "train_history.json"]
    a = torch.load(single["checkpoint"], weights_only=True)
    b = torch.load(ddp["checkpoint"], weights_only=True)
    assert a.keys() == b.keys() and b["lloss_module"] is None
    def layout(state: dict) -> dict:
        return {k: (v.shape, v.dtype) for k, v in state.items()}

    assert layout(a["backbone"]) == layout(b["backbone"]) and layout(a["td_module"]) == layout(b["td_module"])
    pipeline.load_models(two, ddp["checkpoint"])  # loads into the plain (not DDP, not SyncBN) models

    hist_a, hist_b = read_json(single["history"]), read_json(ddp["history"])
    assert seen == hist_b  # on_epoch got each record while the ranks trained
    assert [r.keys() for r in hist_a] == [r.keys() for r in hist_b]
    assert [(r["epoch"], r["lr"]) for r in hist_a] == [(r["epoch"], r["lr"]) for r in hist_b]
    # Global BatchNorm (module docstring): the same training up to float rounding.
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(hist_a, hist_b)) < EXACT
    assert _max_diff(a["backbone"], b["backbone"]) < EXACT
    assert _max_diff(a["backbone"], b["backbone"], buffers=True) < EXACT
    assert pipeline.train_step(two, 0)["resumed"] is True  # done: no second launch
