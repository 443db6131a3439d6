"""The steps of an active-learning experiment, as plain functions over params and paths.

Each step reads what it needs from the workspace, writes its output atomically under
`runs/<experiment>/cycles/<k>/`, and returns plain values (paths, ids, numbers). A step whose
output already exists returns it without redoing the work, so a rerun after a crash resumes
from the last completed step. The Prefect flows in `flows/` call exactly these functions. The
experiment's set-up is in `tidal.experiment`, the label import in `tidal.labeling.imports`.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.data.dataset import Dataset
from tidal.data.pool import candidate_positions
from tidal.data.errors import DataError
from tidal.device import resolve_device, set_deterministic
from tidal import evaluate
from tidal.experiment import write_curve
from tidal.faults import failpoint
from tidal.inputs import dataset_for, eval_split, frozen, model_data, pretrained_backbone, weights_file
from tidal.models import build_backbone
from tidal.models.backbones import TIMM_PREFIX
from tidal.models.frozen import FrozenHead
from tidal.scoring import Rows, merge_top_k, score_shard, select_candidates, shard_range
from tidal.strategies import build_strategy
from tidal.train import AUX_MODULES, DistributedContext, TrainConfig, aux_kind, train_cycle
from tidal.workspace import atomic_write_bytes, read_csv, read_json, workspace, write_csv, write_json

log = logging.getLogger("tidal")


def cycle_seed(seed: int, cycle: int) -> int:
    """The seed of a cycle's training and strategy: distinct per (seed, cycle), so every cycle
    draws afresh and a resumed cycle draws as the uninterrupted one did."""
    return seed * 1_000_003 + cycle


# --- one cycle ------------------------------------------------------------------------------

def _labeled_tensors(data: Dataset, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = list(state["labeled"])
    pos = data.index_of(ids)
    labels = torch.tensor([state["labeled"][i] for i in ids], dtype=torch.long)
    return data.pool_images[pos], labels


def build_models(params: dict, data: Dataset) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The backbone and the strategy's auxiliary module: TD predictor, loss predictor or None.

    With a frozen backbone the trainable part is a FrozenHead over the cached stage features
    (`data` from `model_data`), with the stages of the full network."""
    if frozen(params):
        from tidal.models.timm_backbone import stage_channels

        stages = list(stage_channels(params["backbone"].removeprefix(TIMM_PREFIX)))
        backbone = FrozenHead(stages, data.num_classes, dropout=params["dropout"])
    else:
        backbone = build_backbone(params["backbone"], data.in_channels, data.num_classes, dropout=params["dropout"])
    kind = build_strategy(params["strategy"], params=params).aux
    aux = AUX_MODULES[kind].build(backbone.stage_channels, data.num_classes,
                                  TrainConfig.from_params(params["train"])) if kind else None
    return backbone, aux


def model_spec(params: dict[str, Any], data: Dataset) -> dict[str, Any]:
    """What rebuilds the backbone from a checkpoint without the data set (kept in the checkpoint)."""
    return {"backbone": params["backbone"], "dropout": params["dropout"], "num_classes": data.num_classes,
            "in_shape": list(data.image_shape or data.pool_images.shape[1:])}


def load_models(params: dict, checkpoint: str | Path, data: Dataset | None = None
                ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The cycle's models from its checkpoint; `data` as `model_data` gives it."""
    data = data or model_data(params)
    backbone, aux = build_models(params, data)
    _load_weights(backbone, aux, checkpoint)
    return backbone, aux


def _load_weights(backbone: torch.nn.Module, aux: torch.nn.Module | None, checkpoint: str | Path) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved["backbone"]
    if isinstance(backbone, FrozenHead):  # a checkpoint holds the whole network: the head is its part
        state = {k: v for k, v in state.items() if k.startswith("head.")}
    backbone.load_state_dict(state)
    if aux is not None:
        aux.load_state_dict(saved[aux_kind(aux).checkpoint_key])


def train_step(params: dict[str, Any], cycle: int, on_epoch: Callable[[dict], None] | None = None,
               distributed: DistributedContext | None = None) -> dict[str, Any]:
    """Train on the current labeled set; save cycles/<k>/model.pt and train_history.json.

    With distributed.nproc_per_node > 1 this launches torchrun with tidal.train_ddp and waits;
    each rank calls this function with `distributed`, and rank 0 writes the files.
    """
    ws = workspace(params)
    out_dir = ws.cycle_dir(cycle)
    ckpt, hist_path = out_dir / "model.pt", out_dir / "train_history.json"
    if ckpt.is_file() and hist_path.is_file():
        return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": True}
    if distributed is None and params["distributed"]["nproc_per_node"] > 1:
        from tidal.launch import launch

        log.info("cycle %d: training on %d processes (torchrun)", cycle, params["distributed"]["nproc_per_node"])
        try:
            launch(params, cycle, on_epoch)
            if not (ckpt.is_file() and hist_path.is_file()):
                raise RuntimeError(f"distributed training of cycle {cycle} ended without writing {ckpt} "
                                   f"and {hist_path}")
        except BaseException:
            # A failed run keeps nothing, not even files rank 0 finished: the rerun retrains.
            ckpt.unlink(missing_ok=True)
            hist_path.unlink(missing_ok=True)
            raise
        return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": False}
    state = ws.load_state()
    data = model_data(params)
    images, labels = _labeled_tensors(data, state)
    device = resolve_device(params["device"])
    set_deterministic(device)
    seed = cycle_seed(params["seed"], cycle)
    torch.manual_seed(seed)
    backbone, aux = build_models(params, data)
    if params["train"]["backbone_mode"] == "finetune":
        from tidal.models.timm_backbone import load_backbone_weights

        load_backbone_weights(backbone, weights_file(params))
    if params["train"]["warm_start"] and cycle > 0:
        # After the seeding, so the data order and augmentation draws stay those of a fresh start.
        _load_weights(backbone, aux, ws.cycle_dir(cycle - 1) / "model.pt")
    log.info("cycle %d: training %s on %d labeled samples (%s)", cycle, params["backbone"], len(labels), device)
    def epoch_done(record: dict) -> None:
        failpoint("train:epoch" if distributed is None else f"train_ddp:rank{distributed.rank}:epoch")
        if on_epoch is not None:
            on_epoch(record)

    history = train_cycle(backbone, aux, images, labels, TrainConfig.from_params(params["train"]), device,
                          seed, on_epoch=epoch_done, desc=f"cycle {cycle} train", dist=distributed)
    if distributed is not None and distributed.rank != 0:
        return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": False}  # rank 0 writes
    saved = {"backbone": _whole_network(params, data, backbone).state_dict(),
             **{kind.checkpoint_key: None for kind in AUX_MODULES.values()}, "spec": model_spec(params, data)}
    if aux is not None:
        saved[aux_kind(aux).checkpoint_key] = aux.state_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write_bytes(ckpt, buffer.getvalue())
    write_json(hist_path, history)
    failpoint("train:saved")
    return {"checkpoint": str(ckpt), "history": str(hist_path), "resumed": False}


def _whole_network(params: dict[str, Any], data: Dataset, backbone: torch.nn.Module) -> torch.nn.Module:
    """What a checkpoint holds: the network that classifies images. A frozen backbone's trained
    head goes back onto the pretrained network, so MLflow's model and `tidal register` see
    the whole classifier."""
    if not isinstance(backbone, FrozenHead):
        return backbone
    whole = pretrained_backbone(params, data.image_shape[0], data.num_classes)
    whole.head.load_state_dict(backbone.head.state_dict())
    return whole


def evaluate_step(params: dict[str, Any], cycle: int, checkpoint: str) -> float:
    """Accuracy of the cycle's model on the fixed test split, or on the validation split with
    `validation_size` > 0 (cycles/<k>/eval.json, whose `split` says which)."""
    out = workspace(params).cycle_dir(cycle) / "eval.json"
    if out.is_file():
        return float(read_json(out)["accuracy"])
    data = model_data(params)
    backbone, _ = load_models(params, checkpoint, data)
    acc = evaluate.accuracy(backbone, data.test_images, data.test_labels, resolve_device(params["device"]),
                   params["score_batch_size"], hflip=params["eval_hflip"])
    write_json(out, {"accuracy": acc, "split": eval_split(params), "n_evaluated": len(data.test_labels),
                     "eval_hflip": params["eval_hflip"]})
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
    data = model_data(params)
    taken = data.index_of(list(_taken_ids(params, state, data))).numpy()
    # Positions, not ids: scoring every unlabeled file of a large pool holds no string per file.
    candidates = candidate_positions(len(data.pool_ids), taken, params["subset_size"], params["seed"], cycle)
    k = params["budget"]
    backbone, td = load_models(params, checkpoint, data)
    strategy = build_strategy(params["strategy"], seed=cycle_seed(params["seed"], cycle), params=params)
    # Set strategies that ask for it (CoreSet) also see the labeled set.
    labeled_images = (data.pool_images[data.index_of(list(state["labeled"]))]
                      if getattr(strategy, "uses_labeled", False) else None)
    # The candidates' images are gathered a batch at a time (Rows), never all at once: scoring
    # every unlabeled image of a large pool holds one batch of them.
    pos, scores = select_candidates(backbone, td, Rows(data.pool_images, torch.from_numpy(candidates), data.release_pages),
                                    strategy, k, resolve_device(params["device"]), params["score_batch_size"],
                                    labeled_u8=labeled_images)
    rows = [{"id": data.pool_ids[int(candidates[p])], "score": f"{s:.8g}"} for p, s in zip(pos.tolist(), scores.tolist())]
    failpoint("score:before-write")
    write_csv(out, ["id", "score"], rows)
    log.info("cycle %d: scored %d candidates with %s", cycle, len(candidates), params["strategy"])
    return str(out)


def _taken_ids(params: dict[str, Any], state: dict, data: Dataset) -> set[str]:
    """The ids that are not candidates: labeled, or waiting for an annotator.

    Refuses a pool with fewer unlabeled samples left than the budget.
    """
    taken = set(state["labeled"]) | set(state["pending"])
    n_unlabeled = len(data.pool_ids) - len(taken)
    if n_unlabeled == 0:
        raise DataError(f"no unlabeled samples are left in the pool of {len(data.pool_ids)}; "
                        f"the experiment cannot query more (lower `cycles`)")
    if n_unlabeled < params["budget"]:
        raise DataError(f"budget={params['budget']} is larger than the {n_unlabeled} unlabeled samples left "
                        f"in the pool; lower `budget` or `cycles`")
    return taken


def shards_dir(params: dict[str, Any], cycle: int) -> Path:
    return workspace(params).cycle_dir(cycle) / "shards"


def score_shard_step(params: dict[str, Any], cycle: int, checkpoint: str, shard: int, n_shards: int
                     ) -> dict[str, Any]:
    """Score shard `shard` of `n_shards` of this cycle's candidates (pointwise strategies only) and
    keep its top `budget` in cycles/<k>/shards/<shard>-of-<n_shards>.json.

    Self-contained, for a worker process or host: it draws the candidates, loads the model and
    gathers the images it scores from params and the checkpoint path, one batch at a time. Its
    memory is one batch, the top k and the candidate draw (17 bytes per pool sample), never the
    pool's images. The file lists candidate numbers (places in the cycle's candidate list), ids
    and the float32 scores exactly. Returns {path, start, stop, seconds, resumed}.
    """
    began = time.perf_counter()
    out = shards_dir(params, cycle) / f"{shard:04d}-of-{n_shards:04d}.json"
    if out.is_file():
        saved = read_json(out)
        return {"path": str(out), "start": saved["start"], "stop": saved["stop"], "seconds": 0.0, "resumed": True}
    strategy = build_strategy(params["strategy"], seed=cycle_seed(params["seed"], cycle), params=params)
    state = workspace(params).load_state()
    data = model_data(params)
    taken = data.index_of(list(_taken_ids(params, state, data))).numpy()
    candidates = candidate_positions(len(data.pool_ids), taken, params["subset_size"], params["seed"], cycle)
    start, stop = shard_range(len(candidates), shard, n_shards, params["score_batch_size"])
    pos, scores = torch.empty(0, dtype=torch.long), torch.empty(0)
    if stop > start:
        backbone, aux = load_models(params, checkpoint, data)
        pos, scores = score_shard(backbone, aux, data.pool_images, torch.from_numpy(candidates[start:stop]), start,
                                  strategy, params["budget"], resolve_device(params["device"]),
                                  params["score_batch_size"], release=data.release_pages)
    ids = [data.pool_ids[i] for i in candidates[pos.numpy()].tolist()]
    # JSON writes a float32 score, widened to a Python float, with every digit: the merge reads it back exactly.
    write_json(out, {"shard": shard, "n_shards": n_shards, "start": start, "stop": stop,
                     "n_candidates": len(candidates), "candidates": pos.tolist(), "ids": ids,
                     "scores": scores.tolist()})
    log.info("cycle %d: shard %d/%d scored candidates %d..%d of %d with %s", cycle, shard + 1, n_shards,
             start, stop, len(candidates), params["strategy"])
    return {"path": str(out), "start": start, "stop": stop, "seconds": time.perf_counter() - began, "resumed": False}


def merge_scores_step(params: dict[str, Any], cycle: int, shard_paths: list[str]) -> str:
    """Merge the shards' top-k lists into cycles/<k>/scores.csv, the file `score_step` writes for
    the same cycle: same ids, same order, same scores."""
    out = workspace(params).cycle_dir(cycle) / "scores.csv"
    if out.is_file():
        return str(out)
    parts = sorted((read_json(p) for p in shard_paths), key=lambda part: part["start"])
    starts = [part["start"] for part in parts]
    stops = [part["stop"] for part in parts]
    totals = {part["n_candidates"] for part in parts}
    if not parts or len(totals) != 1 or starts != [0, *stops[:-1]] or stops[-1] != totals.pop():
        raise DataError(f"the shard files {shard_paths} do not cover cycle {cycle}'s candidates exactly once "
                        f"(written with another scoring.shards or score_batch_size?); delete "
                        f"{shards_dir(params, cycle)} to score the cycle again")
    pos, scores = merge_top_k([(torch.tensor(part["candidates"], dtype=torch.long),
                                torch.tensor(part["scores"], dtype=torch.float32)) for part in parts],
                              params["budget"])
    id_of = {c: i for part in parts for c, i in zip(part["candidates"], part["ids"])}
    rows = [{"id": id_of[c], "score": f"{s:.8g}"} for c, s in zip(pos.tolist(), scores.tolist())]
    failpoint("score:before-write")
    write_csv(out, ["id", "score"], rows)
    log.info("cycle %d: merged the top %d of %d shards", cycle, len(rows), len(parts))
    return str(out)


def select_step(scores_path: str, k: int) -> list[str]:
    """The k highest-scoring ids, most uncertain first."""
    ids = [row["id"] for row in read_csv(scores_path)][:k]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{scores_path} lists an id twice; delete it to rescore the cycle")
    return ids


def query_id(params: dict[str, Any], cycle: int) -> str:
    return f"{params['experiment']}-cycle{cycle}"


def export_query(params: dict[str, Any], cycle: int, scores_path: str, ids: list[str]) -> str:
    """Write the query for annotators in cycles/<k>/: query.csv (id, path, score, rank,
    suggested_label), query.jsonl and Label Studio tasks; return the path of query.csv."""
    from tidal.labeling.queries import export_query_files, write_query_images

    scores = {row["id"]: float(row["score"]) for row in read_csv(scores_path)}
    out_dir = workspace(params).cycle_dir(cycle)
    data = dataset_for(params)
    inputs = model_data(params)
    backbone, _ = load_models(params, out_dir / "model.pt", inputs)
    positions = data.index_of(ids)
    logits = evaluate.predict_logits(backbone, inputs.pool_images[positions], resolve_device(params["device"]),
                            params["score_batch_size"], hflip=params["eval_hflip"])
    # The image file each annotator opens: the pool's own, or a PNG written here for array pools.
    if data.pool_files:
        paths = [data.pool_files[p] for p in positions.tolist()]
    else:
        paths = write_query_images(out_dir, data.pool_images[positions])
    confidence, guess = logits.softmax(1).max(1)
    rows = [{"id": i, "path": path, "score": scores[i], "rank": r, "suggested_label": int(y), "confidence": c}
            for r, (i, path, y, c) in enumerate(zip(ids, paths, guess.tolist(), confidence.tolist()), start=1)]
    files = export_query_files(out_dir, params["experiment"], cycle, query_id(params, cycle), rows, data.classes)
    failpoint("export:after")
    return files["csv"]


def push_query(params: dict[str, Any], cycle: int) -> dict[str, Any] | None:
    """Human mode with Label Studio connected: the cycle's query goes to the experiment's
    project as tasks (idempotent: a task already there is not pushed again). None otherwise."""
    from tidal.labeling import labelstudio

    if params["label_mode"] != "human" or labelstudio.settings(params) is None:
        return None
    ws = workspace(params)
    pushed = labelstudio.push_query(params, ws.root, ws.cycle_dir(cycle))
    failpoint("labelstudio:pushed")
    return pushed


def reveal_oracle_labels(params: dict[str, Any], ids: list[str]) -> dict[str, int]:
    """Simulation: the dataset's own labels for the queried ids."""
    data = dataset_for(params)
    return dict(zip(ids, data.pool_labels[data.index_of(ids)].tolist()))


def commit_cycle(params: dict[str, Any], cycle: int, accuracy: float, query_path: str,
                 new_labels: dict[str, int] | None, tracking: dict[str, Any] | None = None,
                 queried_ids: list[str] | None = None) -> dict[str, Any]:
    """The one state transition of a cycle: record its result and move to cycle k+1.

    Oracle mode passes the revealed `new_labels`; human mode passes None and the queried ids,
    which wait for annotators (`pending`) until `import_labels` brings their labels.
    """
    ws = workspace(params)
    state = ws.load_state()
    if state["cycle"] != cycle:
        raise RuntimeError(f"state is at cycle {state['cycle']}, cannot commit cycle {cycle}")
    queried = list(new_labels) if new_labels is not None else list(queried_ids or [])
    overlap = set(queried) & set(state["labeled"])
    if overlap:
        raise ValueError(f"cycle {cycle} queried {len(overlap)} already labeled id(s), e.g. {sorted(overlap)[:3]}")
    record = {"cycle": cycle, "n_labeled": len(state["labeled"]), "accuracy": accuracy,
              "query": query_path, "query_id": query_id(params, cycle), "n_queried": len(queried),
              **(tracking or {})}
    state["history"].append(record)
    if new_labels is not None:
        state["labeled"].update(new_labels)
    else:
        state.setdefault("pending", {}).update(
            {i: {"cycle": cycle, "query_id": record["query_id"]} for i in queried})
        state["awaiting_labels"] = True
    state["cycle"] = cycle + 1
    ws.save_state(state)
    write_curve(ws, state, eval_split(params))
    return record


def score_candidates(params: dict[str, Any], cycle: int, checkpoint: str) -> str:
    """scores.csv of the cycle: one pass, or `scoring.shards` shards one after another and merged
    (the same file the flow's parallel shard tasks write)."""
    n = params["scoring"]["shards"]
    if n == 1:
        return score_step(params, cycle, checkpoint)
    parts = [score_shard_step(params, cycle, checkpoint, s, n)["path"] for s in range(n)]
    return merge_scores_step(params, cycle, parts)


def run_cycle(params: dict[str, Any], cycle: int, on_epoch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """One whole cycle in this process, tracking off: the steps the flow runs as tasks, in its order.

    Train on the current labels, evaluate, score the candidates, select, export the query, then
    reveal the oracle's labels (label_mode=oracle) or leave the query pending (human), and commit.
    Returns the committed history record plus `resumed` (the checkpoint was already there) and
    `seconds` per step (train, evaluate, score, commit: select + export + commit), each read after a
    device sync so GPU work is counted where it ran.
    """
    device = resolve_device(params["device"])
    seconds: dict[str, float] = {}
    last = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal last
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        seconds[step], last = now - last, now

    trained = train_step(params, cycle, on_epoch=on_epoch)
    lap("train")
    acc = evaluate_step(params, cycle, trained["checkpoint"])
    lap("evaluate")
    scores = score_candidates(params, cycle, trained["checkpoint"])
    lap("score")
    ids = select_step(scores, params["budget"])
    query = export_query(params, cycle, scores, ids)
    push_query(params, cycle)
    labels = reveal_oracle_labels(params, ids) if params["label_mode"] == "oracle" else None
    record = commit_cycle(params, cycle, acc, query, labels, queried_ids=ids)
    lap("commit")
    return {**record, "resumed": trained["resumed"], "seconds": seconds}
