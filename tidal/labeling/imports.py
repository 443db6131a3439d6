"""The label-import transaction: annotators' answers into an experiment, all or nothing.

`import_labels` checks a file of answers against the experiment and commits it in an order a
rerun completes from any point: the journal `runs/<experiment>/import.json`, the provenance log
`data/labels/<experiment>.csv` (`labels_file`), then `finish_import` (state.json, the DVC pin,
the new data version; the journal last). `pull_labels` brings Label Studio's answers through the
same path; `query_progress` and `waiting_for_labels` say how far the last query is answered.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from tidal.data.version import (LABELS_DIR, dvc_add, dvc_dir_md5, dvc_executable, experiment_data_version, pin_file,
                                pin_lock, pinned_md5)
from tidal.faults import failpoint
from tidal.inputs import dataset_for
from tidal.labeling import labelstudio
from tidal.labeling.annotations import LabelImportError, check_against_state, read_annotations
from tidal.labeling.provenance import append_provenance, current_labels, provenance_rows
from tidal.workspace import read_json, workspace, write_json


def labels_file(params: dict[str, Any]) -> Path:
    """The append-only provenance log of human labels, inside the DVC-pinned data_root."""
    return Path(params["data_root"]) / LABELS_DIR / f"{params['experiment']}.csv"


IMPORT_JOURNAL = "import.json"  # in the workspace while an import is being committed


def import_labels(params: dict[str, Any], path: str | Path, fmt: str | None = None, force: bool = False,
                  relabel: bool = False, on_version: Callable[[str], None] | None = None,
                  dry_run: bool = False) -> dict[str, Any]:
    """Validate annotations against the experiment and merge them, all or nothing.

    Everything that can fail is checked before anything is written: the experiment, the file,
    its ids and labels, and that the DVC which pins the labels can run. Then the import commits
    in an order a rerun completes from any point: the journal `runs/<experiment>/import.json`,
    the provenance log (the truth about who labelled what), then `finish_import` (state.json, the
    DVC pin, `on_version` with the new data version, e.g. the MLflow tag; the journal last). A
    crash anywhere leaves the journal, and the next import or run of the experiment finishes it.
    Returns the summary: counts, data version, whether DVC pinned it. `dry_run`: every check,
    nothing written; the summary's counts say what the import would do.
    """
    ws = workspace(params)
    if not ws.exists():
        raise LabelImportError(f"no experiment '{params['experiment']}' under {ws.root.parent}/: start it with "
                               f"`tidal run --set experiment={params['experiment']} --set label_mode=human`")
    finish_import(params, on_version)  # an import a crash left open commits first
    state = ws.load_state()
    log_path = labels_file(params)
    # Rows of the provenance log are the truth even where state.json lags behind them.
    logged = current_labels(log_path) if log_path.is_file() else {}
    labeled = {**state["labeled"], **logged}
    pending = {i: q for i, q in state["pending"].items() if i not in logged}
    data = dataset_for(params)
    ann = read_annotations(Path(path), data.classes, fmt, conflicts=params["label_conflicts"])
    plan = check_against_state(ann, experiment=params["experiment"], pool_ids=set(data.pool_ids),
                               pending=pending, labeled=labeled, force=force, relabel=relabel)
    if pin_file(params["data_root"]).is_file():
        dvc_executable()  # a DataError now, with nothing written, if the pin could not be renewed
    changed = {**{i: a.label for i, a in plan.new.items()}, **{i: a.label for i, (_, a) in plan.relabeled.items()}}
    summary = {"file": str(path), "new": len(plan.new), "relabeled": len(plan.relabeled),
               "unchanged": len(plan.unchanged), "skipped": len(ann.skipped),
               "label_conflicts": ann.policy, "conflicts": len(ann.conflicts),
               "conflicts_refused": ann.refused(), "conflict_report": ann.conflict_report(data.classes),
               "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if dry_run:
        return summary
    known = {**pending, **{i: {"cycle": state["cycle"] - 1, "query_id": ann.query_id or "forced"}
                           for i in changed if i not in pending}}
    log_rows = dict(plan=plan, cycle_of={i: known[i]["cycle"] for i in changed},
                    query_of={i: known[i]["query_id"] for i in changed}, source=str(path),
                    imported_at=summary["imported_at"], classes=data.classes)
    if changed:
        append_provenance(log_path, **log_rows, dry_run=True)  # a log it cannot extend fails here
    # The journal names the labels it commits, so a crash before the log has them is told apart
    # from one after: finish_import drops a journal whose labels never reached the log.
    write_json(ws.root / IMPORT_JOURNAL, {**summary, "labels": changed})
    failpoint("import:journal")
    if changed:
        append_provenance(log_path, **log_rows)
    failpoint("import:logged")
    return finish_import(params, on_version)


def finish_import(params: dict[str, Any], on_version: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Commit the import whose journal is in the workspace; None when there is none.

    Each step is derived from what is already written, so running it again after a crash at any
    point gives the same end state: state.json takes the provenance log's labels, data_root is
    re-pinned by DVC when its pin differs, `on_version` gets the data version, the journal goes.
    A journal whose labels are not in the log (a crash before the log was written) is dropped
    and nothing is committed: that import never happened, and running it again does it.
    """
    ws = workspace(params)
    journal = ws.root / IMPORT_JOURNAL
    if not journal.is_file():
        return None
    summary = read_json(journal)
    committed = summary.pop("labels", None)
    log_path = labels_file(params)
    logged = current_labels(log_path) if log_path.is_file() else {}
    if committed and any(logged.get(i) != label for i, label in committed.items()):
        journal.unlink()
        return None
    state = ws.load_state()
    pending = {i: q for i, q in state["pending"].items() if i not in logged}
    version = experiment_data_version(params["data_root"], params["experiment"])
    summary = {**summary, "still_pending": len(pending), "data_version": version}
    if summary["new"]:
        state["awaiting_labels"] = False
    state["labeled"], state["pending"], state["data_version"] = {**state["labeled"], **logged}, pending, version
    imports = state["imports"]
    if not imports or imports[-1].get("imported_at") != summary["imported_at"]:
        imports.append(summary)
    ws.save_state(state)
    failpoint("import:state")
    pin = pin_file(params["data_root"])
    if pin.is_file():
        with pin_lock(params["data_root"]):
            if pinned_md5(pin) != dvc_dir_md5(params["data_root"]):
                dvc_add(params["data_root"])
    failpoint("import:pinned")
    if on_version is not None:
        on_version(version)
    journal.unlink()
    return {**summary, "dvc_pinned": pin.is_file()}


def pull_labels(params: dict[str, Any], min_new: int | None = None,
                on_version: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Import what annotators answered in Label Studio for the pending queries, through
    `import_labels` (the rules of `tidal import-labels`; one file per query, saved in its cycle's
    folder). Every answer is checked first, whatever the count; with fewer than `min_new` new
    labels (default: the `labelstudio.min_new` key; 0 = every pending id) nothing is imported.
    Returns answered/pending/needed counts, `imported` and the import summaries."""
    ws = workspace(params)
    if not ws.exists():
        raise labelstudio.LabelStudioError(f"no experiment '{params['experiment']}' under {ws.root.parent}/")
    finish_import(params, on_version)  # an import a crash left open commits first
    pending = ws.load_state()["pending"]
    cycle_of = {q["query_id"]: q["cycle"] for q in pending.values()}
    files = {q: ws.cycle_dir(c) / labelstudio.EXPORT_FILE for q, c in sorted(cycle_of.items(), key=lambda x: x[1])}
    found = labelstudio.pull_export(params, ws.root, files) if files else {}
    answered = [q for q, n in found.items() if n]
    n_new = sum(import_labels(params, files[q], "label-studio", dry_run=True)["new"] for q in answered)
    need = params["labelstudio"]["min_new"] if min_new is None else min_new
    need = len(pending) if need <= 0 else min(need, len(pending))
    result: dict[str, Any] = {"answered": n_new, "pending": len(pending), "needed": need,
                              "imported": False, "imports": []}
    if not pending or n_new < need:
        return result
    result["imports"] = [import_labels(params, files[q], "label-studio", on_version=on_version) for q in answered]
    result["imported"] = True
    return result


def query_progress(params: dict[str, Any]) -> dict[str, int]:
    """Of the last query: how many of its ids have labels in the labels log (`answered`), how many
    still wait (`pending`), and how many the next cycle needs (`needed`: `labelstudio.min_new`,
    0 = the whole query)."""
    state = workspace(params).load_state()
    query_id = str(state["history"][-1]["query_id"]) if state["history"] else None
    pending = sum(1 for q in state["pending"].values() if str(q["query_id"]) == query_id)
    log = labels_file(params)
    answered = len({r["id"] for r in provenance_rows(log) if r["query_id"] == query_id}) if log.is_file() else 0
    need = params["labelstudio"]["min_new"]
    need = answered + pending if need <= 0 else min(need, answered + pending)
    return {"answered": answered, "pending": pending, "needed": need}


def waiting_for_labels(params: dict[str, Any]) -> dict[str, Any] | None:
    """In human mode, the query annotators still have to return before the next cycle."""
    ws = workspace(params)
    if not ws.exists():
        return None
    state = ws.load_state()
    if not state["awaiting_labels"]:
        return None
    last = state["history"][-1]
    return {"query_id": last["query_id"], "query": last["query"], "n_pending": len(state["pending"])}
