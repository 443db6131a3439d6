"""An experiment's identity and set-up: which params it runs on, what defines it, and its start.

An experiment is its workspace `runs/<experiment>/`. Its recorded `--set` overrides are applied
again under new ones by every later command on it (`experiment_params`); its fingerprint, every
params key outside `RESUMABLE_KEYS`, defines it, and a run whose params differ there is refused
(`ExperimentMismatch`). `start_experiment` creates the workspace with the seeded initial labeled
set, or checks and resumes it; `preflight` is what `tidal run` checks before any server starts.
The cycle's steps are in `tidal.pipeline`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tidal.config import DEFAULTS, dump_params, flatten, load_params
from tidal.data.pool import initial_labeled_ids
from tidal.data.dataset import Dataset
from tidal.data.errors import DataError
from tidal.data.sources import materialize
from tidal.data.version import LABELS_DIR, experiment_data_version, pin_file, verify_data_version
from tidal.inputs import dataset_for, eval_split, frozen, model_data, pretrained_backbone
from tidal.labeling.imports import finish_import
from tidal.workspace import (LEARNING_CURVE_COLUMNS, ExperimentLock, Workspace, atomic_write_text, workspace,
                             write_csv, write_json)

# Keys that may change between runs of one experiment; every other key defines it.
RESUMABLE_KEYS = {"cycles", "device", "score_batch_size", "runs_dir", "data_root", "preset", "tracking", "study",
                  "train.compile", "distributed", "scoring", "label_conflicts", "labelstudio"}


class ExperimentMismatch(ValueError):
    """The params do not match the experiment already in the workspace."""


def _override_key(text: str) -> str:
    return text.split("=", 1)[0].strip()


def merge_overrides(recorded: list[str], new: list[str]) -> list[str]:
    """`key=value` overrides, one per key: a new value of a key replaces the recorded one."""
    merged: dict[str, str] = {}
    for text in [*recorded, *new]:
        merged.pop(_override_key(text), None)
        merged[_override_key(text)] = text
    return list(merged.values())


def experiment_params(params_path: str | Path | None, overrides: list[str] | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The params of the experiment that a params file and `--set` overrides name, and the
    overrides to record for it.

    An experiment remembers the overrides it was started (and resumed) with, in its state. Every
    later command on it applies them again under the new ones, so `tidal status --experiment E`,
    `tidal import-labels FILE --experiment E` and `tidal run --set experiment=E` see the data set,
    data_root and settings E runs on, not only what ./params.yaml says. A new value of a key that
    defines the experiment is still refused when it would resume (ExperimentMismatch).
    """
    overrides = list(overrides or [])
    params = load_params(params_path, overrides)
    ws = workspace(params)
    recorded = ws.load_state()["overrides"] if ws.exists() else []
    if not recorded:
        return params, overrides
    merged = merge_overrides(recorded, overrides)
    return load_params(params_path, merged), merged


def _fingerprint(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(params).items()
            if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_KEYS}


# --- experiment set-up ----------------------------------------------------------------------

def prepare_data(params: dict[str, Any]) -> dict[str, str]:
    """Materialize the dataset if missing and check the data directory against its DVC pin.

    Returns {data_dir, data_version, pool_version, dir_version, pinned}: data_version is the
    experiment's own (the pool and its labels, `experiment_data_version`), dir_version the md5
    DVC gives the whole data_root.
    """
    data_dir = materialize(params["data_root"], params["dataset"])
    checked = _checked_data(params)
    own = experiment_data_version(params["data_root"], params["experiment"], pool=str(checked["pool_version"]))
    return {"data_dir": str(data_dir), **checked, "dir_version": checked["data_version"], "data_version": own}


# The data checked while this process holds an experiment's lock: {data_root: (the hold's token,
# the change marks, the check)}. `tidal run` checks the data before Prefect starts and its flow
# opens the experiment under the same hold, so the flow reads the check instead of walking every
# file again. What could change the data meanwhile, tidal's own label imports (of this or any
# experiment on the data root), writes under labels/ and re-pins, which the marks see.
_CHECKED: dict[Path, tuple[object, tuple, dict]] = {}


def _change_marks(data_root: str | Path) -> tuple:
    def mark(path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    return mark(pin_file(data_root)), mark(Path(data_root) / LABELS_DIR)


def _checked_data(params: dict[str, Any]) -> dict:
    """verify_data_version of the data root, once per hold of the experiment's lock unless the
    change marks moved."""
    token = ExperimentLock.holding(workspace(params).root)
    key, marks = Path(params["data_root"]).absolute(), _change_marks(params["data_root"])
    kept = _CHECKED.get(key)
    if token is not None and kept is not None and kept[0] is token and kept[1] == marks:
        return kept[2]
    checked = verify_data_version(params["data_root"])
    if token is not None:
        _CHECKED[key] = (token, marks, checked)
    return checked


def preflight(params: dict[str, Any], on_version: Callable[[str], None] | None = None) -> None:
    """What `tidal run` checks before any server starts, so bad input is one clear error: an
    import a crash left open is finished, the data is checked against its pin, the params against
    the experiment already in the workspace, and the pool is read (image files are decoded into
    their cache now: every file that cannot be, and images of different sizes without
    `image_size`, fail here) and checked against initial_size and budget."""
    finish_import(params, on_version)
    version = prepare_data(params)
    ws = workspace(params)
    if ws.exists():
        _check_resumable(ws.load_state(), params, version["pool_version"], ws)
    data = dataset_for(params)
    if not ws.exists():
        check_pool_size(params, data)
    # A pretrained backbone's weights are checked (every key and shape) now; a frozen one's
    # features are extracted now, with a progress bar, instead of inside the flow's first task.
    if frozen(params):
        model_data(params)
    elif params["train"]["backbone_mode"] == "finetune":
        pretrained_backbone(params, data.in_channels, data.num_classes)


def check_pool_size(params: dict[str, Any], data: Dataset) -> None:
    """A new experiment's initial set and first query must fit in its pool."""
    n = len(data.pool_ids)
    where = f"the pool of '{params['dataset']}' under {params['data_root']}"
    if params["initial_size"] >= n:
        raise DataError(f"initial_size={params['initial_size']} leaves nothing to query: {where} holds {n} "
                        f"samples; set initial_size below {n}")
    if params["initial_size"] + params["budget"] > n:
        raise DataError(f"initial_size={params['initial_size']} + budget={params['budget']} is more than {where} "
                        f"holds ({n} samples); set a budget of at most {n - params['initial_size']}")


def start_experiment(params: dict[str, Any], data_version: str, pool_version: str | None = None,
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Create the workspace with a seeded initial labeled set, or check and resume it.

    The initial set is drawn from the pool samples whose label the source knows (all of them
    for the built-in data sets; the labeled rows of a manifest). `overrides` (from
    `experiment_params`) are recorded, so later commands on the experiment apply them again.
    """
    ws = workspace(params)
    pool_version = pool_version or verify_data_version(params["data_root"])["pool_version"]
    if ws.exists():
        state = ws.load_state()
        _check_resumable(state, params, pool_version, ws)
        if overrides is not None and state["overrides"] != overrides:
            state["overrides"] = overrides
            ws.save_state(state)
        return state
    data = dataset_for(params)
    unlabeled = (data.pool_labels < 0).nonzero().flatten().tolist()
    if params["label_mode"] == "oracle" and unlabeled:
        raise DataError(
            f"label_mode=oracle reveals the data set's own labels, but {len(unlabeled)} pool sample(s) of "
            f"'{params['dataset']}' under {params['data_root']} have none (e.g. "
            f"{[data.pool_ids[i] for i in unlabeled[:3]]}); "
            f"use label_mode=human (annotators label each query) or give every pool row a label")
    initial = initial_labeled(params, data)
    if data.skipped:  # bad_images: skip; which files, and why, stays with the experiment
        ws.root.mkdir(parents=True, exist_ok=True)
        write_csv(ws.skipped_images_path, ["file", "reason"],
                  [{"file": file, "reason": reason} for file, reason in data.skipped])
    labels = data.pool_labels[data.index_of(initial)].tolist()
    state = {
        "experiment": params["experiment"],
        "strategy": params["strategy"],
        "seed": params["seed"],
        "dataset": params["dataset"],
        "data_version": data_version,
        "pool_version": pool_version,
        "fingerprint": _fingerprint(params),
        "cycle": 0,
        "pool_size": len(data.pool_ids),
        "labeled": dict(zip(initial, labels)),
        "label_mode": params["label_mode"],
        # ids exported to annotators and not labeled yet: {id: {"cycle": k, "query_id": q}}
        "pending": {},
        "awaiting_labels": False,
        "imports": [],
        "history": [],
        "tracking": {},
        "overrides": list(overrides or []),
        "skipped_images": len(data.skipped),
    }
    ws.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ws.root / "params.yaml", dump_params(params))
    ws.save_state(state)
    write_curve(ws, state, eval_split(params))
    return state


def initial_labeled(params: dict[str, Any], data: Dataset) -> list[str]:
    """The seeded initial labeled ids, drawn from the pool samples whose label the source knows."""
    has_label = data.pool_labels >= 0
    known = (data.pool_ids if bool(has_label.all())  # no list of every id when all are known
             else [data.pool_ids[i] for i in has_label.nonzero().flatten().tolist()])
    return initial_labeled_ids(known, min(params["initial_size"], len(known)), params["seed"])


def _check_resumable(state: dict, params: dict, pool_version: str, ws: Workspace) -> None:
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
    started = state["pool_version"]
    if started != pool_version:
        raise DataError(
            f"the pool data under {params['data_root']}/ changed since experiment "
            f"'{params['experiment']}' started (version {started} -> {pool_version}); "
            f"restore it with `dvc checkout` or start a new experiment")


def load_state(params: dict[str, Any]) -> dict[str, Any]:
    return workspace(params).load_state()


def write_curve(ws: Workspace, state: dict, split: str) -> None:
    """learning_curve.csv and metrics.json from the history; `split` (tidal.inputs.eval_split)
    is the split the accuracies were measured on."""
    rows = [{"strategy": state["strategy"], "seed": state["seed"], "cycle": h["cycle"],
             "n_labeled": h["n_labeled"], "accuracy": f"{h['accuracy']:.6f}"} for h in state["history"]]
    write_csv(ws.learning_curve_path, LEARNING_CURVE_COLUMNS, rows)
    accs = [h["accuracy"] for h in state["history"]]
    write_json(ws.metrics_path, {
        "cycles_done": len(accs),
        "n_labeled": len(state["labeled"]),
        "final_accuracy": accs[-1] if accs else None,
        # AUBC as the plain mean of the accuracy over the cycles' budgets.
        "aubc": sum(accs) / len(accs) if accs else None,
        "split": split,
    })
