"""The steps of an active-learning experiment, as plain functions over params and paths.

Each step reads what it needs from the workspace, writes its output atomically under
`runs/<experiment>/cycles/<k>/`, and returns plain values (paths, ids, numbers). A step whose
output already exists returns it without redoing the work, so a rerun after a crash resumes
from the last completed step. The Prefect flows in `flows/` call exactly these functions.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.config import DEFAULTS, dump_params, flatten
from tidal.data.pool import candidate_ids, initial_labeled_ids
from tidal.data.sources import DataError, Dataset, load_dataset, materialize
from tidal.data.version import verify_data_version
from tidal.device import resolve_device, set_deterministic
from tidal.evaluate import accuracy
from tidal.models import TDPredictor, build_backbone
from tidal.scoring import select_candidates
from tidal.strategies import build_strategy
from tidal.train import TrainConfig, train_cycle
from tidal.workspace import (LEARNING_CURVE_COLUMNS, Workspace, atomic_write_text, read_csv, read_json,
                             write_csv, write_json)

log = logging.getLogger("tidal")

# Keys that may change between runs of one experiment; every other key defines it.
RESUMABLE_KEYS = {"cycles", "device", "score_batch_size", "runs_dir", "data_root", "preset", "tracking"}


class ExperimentMismatch(ValueError):
    """The params do not match the experiment already in the workspace."""


def workspace(params: dict[str, Any]) -> Workspace:
    return Workspace(params["runs_dir"], params["experiment"])


def _fingerprint(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(params).items() if k.split(".")[0] not in RESUMABLE_KEYS}


def _cycle_seed(seed: int, cycle: int) -> int:
    return seed * 1_000_003 + cycle


# --- experiment set-up ----------------------------------------------------------------------

def prepare_data(params: dict[str, Any]) -> dict[str, str]:
    """Materialize the dataset if missing and check the data directory against its DVC pin.

    Returns {data_dir, data_version, pinned}; the version is the md5 DVC gives data_root.
    """
    data_dir = materialize(params["data_root"], params["dataset"])
    return {"data_dir": str(data_dir), **verify_data_version(params["data_root"])}


def dataset_for(params: dict[str, Any]) -> Dataset:
    return load_dataset(params["data_root"], params["dataset"], params["imbalance_ratio"], seed=0)


def start_experiment(params: dict[str, Any], data_version: str) -> dict[str, Any]:
    """Create the workspace with a seeded initial labeled set, or check and resume it."""
    ws = workspace(params)
    if ws.exists():
        state = ws.load_state()
        _check_resumable(state, params, data_version, ws)
        return state
    data = dataset_for(params)
    initial = initial_labeled_ids(data.pool_ids, params["initial_size"], params["seed"])
    labels = data.pool_labels[data.index_of(initial)].tolist()
    state = {
        "experiment": params["experiment"],
        "strategy": params["strategy"],
        "seed": params["seed"],
        "dataset": params["dataset"],
        "data_version": data_version,
        "fingerprint": _fingerprint(params),
        "cycle": 0,
        "pool_size": len(data.pool_ids),
        "labeled": dict(zip(initial, labels)),
        "pending_query": None,
        "history": [],
        "tracking": {},
    }
    ws.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ws.root / "params.yaml", dump_params(params))
    ws.save_state(state)
    _write_curve(ws, state)
    return state


def _check_resumable(state: dict, params: dict, data_version: str, ws: Workspace) -> None:
    # A key added to the params after the experiment started counts as its default there.
    defaults = flatten(DEFAULTS)
    old, new = state["fingerprint"], _fingerprint(params)
    changed = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k))
    if changed:
        key = changed[0]
        raise ExperimentMismatch(
            f"experiment '{params['experiment']}' in {ws.root} was started with {key}={old.get(key)!r}, "
            f"now {key}={new.get(key)!r} ({len(changed)} key(s) differ: {', '.join(changed)}). "
            f"Start a new experiment with --set experiment=NEW_NAME, or delete {ws.root} to start over.")
    if state["data_version"] != data_version:
        raise DataError(
            f"the data under {params['data_root']}/{params['dataset']} changed since experiment "
            f"'{params['experiment']}' started (version {state['data_version']} -> {data_version}); "
            f"restore it with `dvc checkout` or start a new experiment")


def record_tracking(params: dict[str, Any], key: str, value: Any) -> None:
    """Remember a tracking id (e.g. the MLflow parent run) in the state, for resumes."""
    ws = workspace(params)
    state = ws.load_state()
    state["tracking"][key] = value
    ws.save_state(state)


def load_state(params: dict[str, Any]) -> dict[str, Any]:
    return workspace(params).load_state()


# --- one cycle ------------------------------------------------------------------------------

def _labeled_tensors(data: Dataset, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = list(state["labeled"])
    pos = data.index_of(ids)
    labels = torch.tensor([state["labeled"][i] for i in ids], dtype=torch.long)
    return data.pool_images[pos], labels


def _build_models(params: dict, data: Dataset) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    backbone = build_backbone(params["backbone"], data.in_channels, data.num_classes, dropout=params["dropout"])
    strategy = build_strategy(params["strategy"], params=params)
    td = TDPredictor(backbone.stage_channels, data.num_classes) if strategy.uses_td_module else None
    return backbone, td


def load_models(params: dict, checkpoint: str | Path, data: Dataset | None = None
                ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    data = data or dataset_for(params)
    backbone, td = _build_models(params, data)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    backbone.load_state_dict(saved["backbone"])
    if td is not None:
        td.load_state_dict(saved["td_module"])
    return backbone, td


def train_step(params: dict[str, Any], cycle: int,
               on_epoch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train on the current labeled set; save cycles/<k>/model.pt and train_history.json."""
    ws = workspace(params)
    out_dir = ws.cycle_dir(cycle)
    ckpt, hist_path = out_dir / "model.pt", out_dir / "train_history.json"
    if ckpt.is_file() and hist_path.is_file():
        return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": True}
    state = ws.load_state()
    data = dataset_for(params)
    images, labels = _labeled_tensors(data, state)
    device = resolve_device(params["device"])
    set_deterministic(device)
    seed = _cycle_seed(params["seed"], cycle)
    torch.manual_seed(seed)
    backbone, td = _build_models(params, data)
    log.info("cycle %d: training %s on %d labeled samples (%s)", cycle, params["backbone"], len(labels), device)
    history = train_cycle(backbone, td, images, labels, TrainConfig.from_params(params["train"]), device,
                          seed, on_epoch=on_epoch, desc=f"cycle {cycle} train")
    saved = {"backbone": backbone.state_dict(), "td_module": td.state_dict() if td is not None else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".pt.tmp")
    torch.save(saved, tmp)
    tmp.replace(ckpt)
    write_json(hist_path, history)
    return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": False}


def evaluate_step(params: dict[str, Any], cycle: int, checkpoint: str) -> float:
    """Test accuracy of the cycle's model on the fixed test split (cycles/<k>/eval.json)."""
    out = workspace(params).cycle_dir(cycle) / "eval.json"
    if out.is_file():
        return float(read_json(out)["test_accuracy"])
    data = dataset_for(params)
    backbone, _ = load_models(params, checkpoint, data)
    acc = accuracy(backbone, data.test_images, data.test_labels, resolve_device(params["device"]),
                   params["score_batch_size"])
    write_json(out, {"test_accuracy": acc, "n_test": len(data.test_labels)})
    return acc


def score_step(params: dict[str, Any], cycle: int, checkpoint: str) -> str:
    """Score this cycle's random candidate subset; keep the top `budget` in cycles/<k>/scores.csv.

    Rows are in selection order: most uncertain first for pointwise strategies, pick order for set
    strategies (whose score is the strategy's pick-time value, e.g. CoreSet's distance).
    """
    ws = workspace(params)
    out = ws.cycle_dir(cycle) / "scores.csv"
    if out.is_file():
        return str(out)
    state = ws.load_state()
    data = dataset_for(params)
    pending = set(state["pending_query"]["ids"]) if state.get("pending_query") else set()
    candidates = candidate_ids(data.pool_ids, set(state["labeled"]) | pending, params["subset_size"],
                               params["seed"], cycle)
    if not candidates:
        raise DataError(f"no unlabeled samples are left in the pool of {len(data.pool_ids)}; "
                        f"the experiment cannot query more (lower `cycles`)")
    k = min(params["budget"], len(candidates))
    backbone, td = load_models(params, checkpoint, data)
    strategy = build_strategy(params["strategy"], seed=_cycle_seed(params["seed"], cycle), params=params)
    # Set strategies that ask for it (CoreSet) also see the labeled set.
    labeled_images = (data.pool_images[data.index_of(list(state["labeled"]))]
                      if getattr(strategy, "uses_labeled", False) else None)
    pos, scores = select_candidates(backbone, td, data.pool_images[data.index_of(candidates)], strategy, k,
                                    resolve_device(params["device"]), params["score_batch_size"],
                                    labeled_u8=labeled_images)
    rows = [{"id": candidates[p], "score": f"{s:.8g}"} for p, s in zip(pos.tolist(), scores.tolist())]
    write_csv(out, ["id", "score"], rows)
    log.info("cycle %d: scored %d candidates with %s", cycle, len(candidates), params["strategy"])
    return str(out)


def select_step(scores_path: str, k: int) -> list[str]:
    """The k highest-scoring ids, most uncertain first."""
    ids = [row["id"] for row in read_csv(scores_path)][:k]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{scores_path} lists an id twice; delete it to rescore the cycle")
    return ids


def export_query(params: dict[str, Any], cycle: int, scores_path: str, ids: list[str]) -> str:
    """Write cycles/<k>/query.csv (id, score, rank) for annotators and the oracle."""
    scores = {row["id"]: row["score"] for row in read_csv(scores_path)}
    out = workspace(params).cycle_dir(cycle) / "query.csv"
    rows = [{"id": i, "score": scores[i], "rank": r} for r, i in enumerate(ids, start=1)]
    write_csv(out, ["id", "score", "rank"], rows)
    return str(out)


def reveal_oracle_labels(params: dict[str, Any], ids: list[str]) -> dict[str, int]:
    """Simulation: the dataset's own labels for the queried ids."""
    data = dataset_for(params)
    return dict(zip(ids, data.pool_labels[data.index_of(ids)].tolist()))


def commit_cycle(params: dict[str, Any], cycle: int, test_accuracy: float, query_path: str,
                 new_labels: dict[str, int], tracking: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one state transition of a cycle: record its result, add the labels, move to cycle k+1."""
    ws = workspace(params)
    state = ws.load_state()
    if state["cycle"] != cycle:
        raise RuntimeError(f"state is at cycle {state['cycle']}, cannot commit cycle {cycle}")
    overlap = set(new_labels) & set(state["labeled"])
    if overlap:
        raise ValueError(f"cycle {cycle} queried {len(overlap)} already labeled id(s), e.g. {sorted(overlap)[:3]}")
    record = {"cycle": cycle, "n_labeled": len(state["labeled"]), "test_accuracy": test_accuracy,
              "query": query_path, "n_queried": len(new_labels), **(tracking or {})}
    state["history"].append(record)
    state["labeled"].update(new_labels)
    state["cycle"] = cycle + 1
    ws.save_state(state)
    _write_curve(ws, state)
    return record


def _write_curve(ws: Workspace, state: dict) -> None:
    rows = [{"strategy": state["strategy"], "seed": state["seed"], "cycle": h["cycle"],
             "n_labeled": h["n_labeled"], "test_accuracy": f"{h['test_accuracy']:.6f}"} for h in state["history"]]
    write_csv(ws.learning_curve_path, LEARNING_CURVE_COLUMNS, rows)
    accs = [h["test_accuracy"] for h in state["history"]]
    write_json(ws.metrics_path, {
        "cycles_done": len(accs),
        "n_labeled": len(state["labeled"]),
        "final_test_accuracy": accs[-1] if accs else None,
        # AUBC as the plain mean of test accuracy over the cycles' budgets.
        "aubc": sum(accs) / len(accs) if accs else None,
    })
