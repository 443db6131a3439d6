"""Human labels: export a cycle's query for annotators, read their answers back, check them
against the experiment, and keep an append-only provenance log of every label.

Plain Python (stdlib csv/json only), no orchestration imports: the CLI and the flows call these
functions with plain values (ids, dicts), so every rule here is testable without a workspace.

- `export_query_files` writes `query.csv`, `query.jsonl`, `query_labelstudio.json` (+ its
  `labelstudio_config.xml`) for one query; annotators fill the `label` field (a class NAME).
- `read_annotations` reads any of these back (or Label Studio's own JSON export) into
  `Annotations`; every bad input is a `LabelImportError` naming the file, the row and what to do.
  Nothing is written while reading.
- `check_against_state` decides what an import would change (`ImportPlan`) or refuses it.
- `append_provenance` appends one row per new/changed label to `labels.csv` (old bytes + new rows,
  written atomically); `label_history` / `current_labels` read it back.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from xml.sax.saxutils import quoteattr

from tidal.workspace import atomic_write_bytes, atomic_write_text

FORMATS = ("csv", "jsonl", "label-studio")
QUERY_COLUMNS = ["experiment", "cycle", "query_id", "id", "path", "score", "rank", "suggested_label", "label"]
PROVENANCE_COLUMNS = ["id", "label", "label_name", "annotator", "cycle", "query_id", "imported_at", "source",
                      "supersedes"]
EXPORT_FILES = {"csv": "query.csv", "jsonl": "query.jsonl", "label-studio": "query_labelstudio.json"}
LABELSTUDIO_CONFIG = "labelstudio_config.xml"
_SHOW = 5  # ids shown in an error message before "... and N more"


class LabelImportError(ValueError):
    """Annotations that cannot be imported; the message names the file/row and what to do."""


@dataclass
class Annotation:
    id: str
    label: int                 # class index
    annotator: str | None
    row: int                   # csv/jsonl: line number (csv header = line 1); label-studio: task number (1-based)


@dataclass
class Annotations:
    experiment: str | None
    query_id: str | None
    cycle: int | None
    labels: list[Annotation]
    skipped: list[str]         # ids left without a label (empty label, skipped/cancelled task)
    source: str                # the file read

    def ids(self) -> list[str]:
        return [a.id for a in self.labels]


@dataclass
class ImportPlan:
    new: dict[str, Annotation] = field(default_factory=dict)
    relabeled: dict[str, tuple[int, Annotation]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    still_pending: list[str] = field(default_factory=list)

    def updates(self) -> dict[str, int]:
        """{id: label} to merge into the experiment's labels (new and relabeled)."""
        out = {i: a.label for i, a in self.new.items()}
        out.update({i: a.label for i, (_, a) in self.relabeled.items()})
        return out


# --- export ---------------------------------------------------------------------------------

def _class_name(classes: list[str], idx: Any) -> str:
    if idx is None or idx == "":
        return ""
    i = int(idx)
    if not 0 <= i < len(classes):
        raise ValueError(f"suggested_label {i} is not a class index (0..{len(classes) - 1})")
    return classes[i]


def export_query_files(out_dir: Path, experiment: str, cycle: int, query_id: str, rows: list[dict],
                       classes: list[str]) -> dict[str, str]:
    """Write the query for annotators in three formats; returns {"csv", "jsonl", "label-studio"} paths.

    rows: dicts with id, path ("" without a file), score, rank (1-based), suggested_label (class index).
    """
    out_dir = Path(out_dir)
    records = []
    for r in rows:
        records.append({
            "experiment": experiment, "cycle": int(cycle), "query_id": query_id, "id": str(r["id"]),
            "path": r.get("path") or "", "score": float(r["score"]), "rank": int(r["rank"]),
            "suggested_label": _class_name(classes, r.get("suggested_label")), "label": None,
        })

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=QUERY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({**rec, "score": repr(rec["score"]), "label": ""})
    paths = {fmt: out_dir / name for fmt, name in EXPORT_FILES.items()}
    atomic_write_text(paths["csv"], buf.getvalue())

    atomic_write_text(paths["jsonl"], "".join(json.dumps(rec) + "\n" for rec in records))

    model_version = f"{experiment}-cycle{cycle}"
    tasks = []
    for rec in records:
        prediction: dict[str, Any] = {"model_version": model_version, "score": rec["score"], "result": []}
        if rec["suggested_label"]:
            prediction["result"] = [{"from_name": "label", "to_name": "image", "type": "choices",
                                     "value": {"choices": [rec["suggested_label"]]}}]
        tasks.append({
            "data": {"image": rec["path"], "sample_id": rec["id"], "experiment": experiment,
                     "cycle": rec["cycle"], "query_id": query_id, "rank": rec["rank"]},
            "predictions": [prediction],
        })
    atomic_write_text(paths["label-studio"], json.dumps(tasks, indent=2) + "\n")
    atomic_write_text(out_dir / LABELSTUDIO_CONFIG, labelstudio_config(classes))
    return {fmt: str(p) for fmt, p in paths.items()}


def labelstudio_config(classes: list[str]) -> str:
    """Label Studio labeling config: one image, one single-choice question over the classes."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return ("<View>\n  <Image name=\"image\" value=\"$image\"/>\n"
            "  <Choices name=\"label\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n"
            f"{choices}\n  </Choices>\n</View>\n")


# --- import ---------------------------------------------------------------------------------

def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _where(source: str, fmt: str, row: int) -> str:
    return f"{source} task #{row}" if fmt == "label-studio" else f"{source} line {row}"


class _Collector:
    """Accumulates rows of one file and enforces the per-file rules."""

    def __init__(self, source: str, fmt: str, classes: list[str]) -> None:
        self.source, self.fmt, self.classes = source, fmt, classes
        self.index = {c: i for i, c in enumerate(classes)}
        self.first_row: dict[str, int] = {}
        self.meta: dict[str, dict[Any, int]] = {"experiment": {}, "query_id": {}, "cycle": {}}
        self.labels: list[Annotation] = []
        self.skipped: list[str] = []
        self.n_rows = 0

    def fail(self, row: int, msg: str) -> LabelImportError:
        return LabelImportError(f"{_where(self.source, self.fmt, row)}: {msg}")

    def add(self, row: int, sample_id: Any, label: Any, annotator: Any, experiment: Any = None,
            query_id: Any = None, cycle: Any = None) -> None:
        self.n_rows += 1
        if sample_id is None or str(sample_id).strip() == "":
            raise self.fail(row, "the sample id is empty; every row must keep the id it was exported with")
        sid = str(sample_id).strip()
        if sid in self.first_row:
            raise self.fail(row, f"id {sid!r} appears twice (also at {_where(self.source, self.fmt, self.first_row[sid])}); "
                                 "keep one answer per sample and import again")
        self.first_row[sid] = row
        for key, value in (("experiment", experiment), ("query_id", query_id), ("cycle", cycle)):
            if value is None or str(value).strip() == "":
                continue
            if key == "cycle":
                try:
                    value = int(str(value).strip())
                except ValueError:
                    raise self.fail(row, f"cycle {value!r} is not an integer") from None
            else:
                value = str(value).strip()
            self.meta[key].setdefault(value, row)
        if label is None or (isinstance(label, str) and label.strip() == ""):
            self.skipped.append(sid)
            return
        if not isinstance(label, str):
            raise self.fail(row, f"label {label!r} for id {sid!r} must be a class name (a string), one of "
                                 f"{self.classes}")
        name = label.strip()
        if name not in self.index:
            raise self.fail(row, f"label {name!r} for id {sid!r} is not one of the classes {self.classes}; "
                                 "fix the label (names are case-sensitive) and import again")
        ann = None if annotator is None or str(annotator).strip() == "" else str(annotator).strip()
        self.labels.append(Annotation(sid, self.index[name], ann, row))

    def finish(self) -> Annotations:
        if self.n_rows == 0:
            raise LabelImportError(f"no annotations in {self.source}: the file has no rows; "
                                   "export the query again and fill in the label column")
        values: dict[str, Any] = {}
        for key, seen in self.meta.items():
            if len(seen) > 1:
                found = ", ".join(f"{v!r} ({_where(self.source, self.fmt, r)})" for v, r in seen.items())
                raise LabelImportError(f"{self.source} mixes several {key} values: {found}; one file must "
                                       "answer one query of one experiment; split it and import each part")
            values[key] = next(iter(seen)) if seen else None
        return Annotations(values["experiment"], values["query_id"], values["cycle"], self.labels,
                           self.skipped, self.source)


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "label-studio"}.get(suffix)
    if fmt is None:
        raise LabelImportError(f"cannot tell the format of {path} from its extension {suffix or '(none)'!r}; "
                               f"pass --format with one of {', '.join(FORMATS)}")
    return fmt


def read_annotations(path: Path, classes: list[str], fmt: str | None = None) -> Annotations:
    """Read filled-in annotations (csv, jsonl, or Label Studio JSON); raises LabelImportError."""
    path = Path(path)
    if fmt is None:
        fmt = _infer_format(path)
    elif fmt not in FORMATS:
        raise LabelImportError(f"unknown format {fmt!r} for {path}; use one of {', '.join(FORMATS)}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LabelImportError(f"no such annotations file: {path}") from None
    except OSError as err:
        raise LabelImportError(f"cannot read {path}: {err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelImportError(f"{path} is not UTF-8 text ({err}); save it as UTF-8 and import again") from None
    col = _Collector(str(path), fmt, list(classes))
    if text.strip() == "":
        raise LabelImportError(f"no annotations in {path}: the file is empty; "
                               "export the query again and fill in the label column")
    {"csv": _read_csv, "jsonl": _read_jsonl, "label-studio": _read_labelstudio}[fmt](text, col)
    return col.finish()


def _read_csv(text: str, col: _Collector) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not any(h.strip() for h in header):  # leading blank lines
            header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as err:
        raise col.fail(reader.line_num, f"unreadable csv ({err})") from None
    header = [h.strip() for h in header]
    missing = [c for c in ("id", "label") if c not in header]
    if missing:
        raise LabelImportError(f"{col.source}: missing column(s) {missing}; found columns {header}; the file needs "
                               "at least `id` and `label` (export the query again, or use --format if this is "
                               "not a csv)")
    pos = {name: i for i, name in reversed(list(enumerate(header)))}  # first occurrence wins

    def cell(values: list[str], name: str) -> str | None:
        i = pos.get(name)
        return values[i] if i is not None and i < len(values) else None

    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise col.fail(reader.line_num, f"unreadable csv ({err})") from None
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > len(header):
            raise col.fail(line, f"{len(values)} fields but the header has {len(header)}; "
                                 "quote values that contain commas")
        col.add(line, cell(values, "id"), cell(values, "label"), cell(values, "annotator"),
                cell(values, "experiment"), cell(values, "query_id"), cell(values, "cycle"))


def _read_jsonl(text: str, col: _Collector) -> None:
    seen_label_key = False
    keys_found: set[str] = set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise col.fail(n, f"malformed JSON ({err}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise col.fail(n, f"expected a JSON object, found {type(obj).__name__}")
        keys_found.update(obj)
        if "id" not in obj:
            raise col.fail(n, f"no `id` key (found keys {sorted(obj)}); keep the id each row was exported with")
        seen_label_key = seen_label_key or "label" in obj
        col.add(n, obj.get("id"), obj.get("label"), obj.get("annotator"), obj.get("experiment"),
                obj.get("query_id"), obj.get("cycle"))
    if col.n_rows and not seen_label_key:
        raise LabelImportError(f"{col.source}: no line has a `label` key (found keys {sorted(keys_found)}); "
                               "add \"label\": \"<class name>\" to each answered line")


def _latest_annotation(annotations: list) -> dict | None:
    live = [(a.get("updated_at") or a.get("created_at") or "", i, a) for i, a in enumerate(annotations)
            if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(live, key=lambda t: (str(t[0]), t[1]))[2] if live else None


def _annotator(completed_by: Any) -> str | None:
    if isinstance(completed_by, dict):
        who = completed_by.get("email") or completed_by.get("username") or completed_by.get("id")
        return None if who is None else str(who)
    return None if completed_by is None else str(completed_by)


def _choice(result: list, col: _Collector, n: int) -> str:
    items = [r for r in result if isinstance(r, dict) and isinstance(r.get("value"), dict)
             and r["value"].get("choices")]
    if not items:
        raise col.fail(n, "the annotation's result has no choice; answer with the `label` choices of "
                          f"{LABELSTUDIO_CONFIG}")
    item = next((r for r in items if r.get("from_name") == "label"), items[0])
    choices = item["value"]["choices"]
    return choices[0] if isinstance(choices, list) else choices


def _read_labelstudio(text: str, col: _Collector) -> None:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as err:
        raise LabelImportError(f"{col.source}: malformed JSON ({err}); export the tasks from Label Studio "
                               "again as JSON") from None
    if isinstance(tasks, dict):  # a single task
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise LabelImportError(f"{col.source}: expected a list of Label Studio tasks, found {type(tasks).__name__}")
    for n, task in enumerate(tasks, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise col.fail(n, "not a Label Studio task (needs a `data` object); export with Label Studio's "
                              "JSON export")
        data = task["data"]
        if "sample_id" not in data:
            raise col.fail(n, f"task data has no `sample_id` (found {sorted(data)}); import tasks from "
                              "query_labelstudio.json so each keeps its sample id")
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise col.fail(n, "`annotations` must be a list")
        latest = _latest_annotation(annotations)
        result = latest.get("result") if latest else None
        if not result:  # no annotation, only cancelled ones, or an empty result: skipped
            label, who = None, None
        else:
            if not isinstance(result, list):
                raise col.fail(n, "the annotation's `result` must be a list")
            label, who = _choice(result, col, n), _annotator(latest.get("completed_by"))
        col.add(n, data.get("sample_id"), label, who, data.get("experiment"), data.get("query_id"),
                data.get("cycle"))


# --- checks against the experiment ----------------------------------------------------------

def check_against_state(ann: Annotations, *, experiment: str, pool_ids: set[str], pending: dict[str, dict],
                        labeled: dict[str, int], force: bool = False, relabel: bool = False) -> ImportPlan:
    """What importing `ann` would change; raises LabelImportError listing every problem found.

    Re-importing an answer that is already recorded (same id, same label) is a no-op (`unchanged`),
    whether or not the id is still pending, so importing the same file twice is harmless.
    """
    if ann.experiment is not None and ann.experiment != experiment:
        raise LabelImportError(f"{ann.source} is a query file from another experiment ({ann.experiment!r}, "
                               f"not {experiment!r}); import it into experiment {ann.experiment!r}")
    unknown, not_pending, conflicts = [], [], []
    plan = ImportPlan()
    for a in ann.labels:
        if a.id not in pool_ids:
            unknown.append(a.id)
        elif a.id in labeled:
            old = int(labeled[a.id])
            if old == a.label:
                plan.unchanged.append(a.id)
            elif relabel:
                plan.relabeled[a.id] = (old, a)
            else:
                conflicts.append(f"{a.id} (labeled {old}, file says {a.label})")
        elif a.id not in pending and not force:
            not_pending.append(a.id)
        else:
            plan.new[a.id] = a
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} id(s) not in the experiment's pool: {_shorten(unknown)} "
                        "(is this the right experiment/dataset?)")
    if not_pending:
        problems.append(f"{len(not_pending)} id(s) not waiting for a label: {_shorten(not_pending)} "
                        "(pass --force to label them anyway)")
    if conflicts:
        problems.append(f"{len(conflicts)} id(s) already labeled differently: {_shorten(conflicts)} "
                        "(pass --relabel to replace the old labels)")
    if problems:
        raise LabelImportError(f"cannot import {ann.source}:\n  " + "\n  ".join(problems))
    answered = {a.id for a in ann.labels}
    plan.still_pending = [i for i in pending if i not in answered]
    return plan


# --- provenance log -------------------------------------------------------------------------

def append_provenance(labels_csv: Path, plan: ImportPlan, *, cycle_of: dict[str, int], query_of: dict[str, str],
                      source: str, imported_at: str, classes: list[str] | None = None) -> int:
    """Append one row per new/relabeled id to labels_csv (old bytes + new rows, atomically); returns rows added."""
    labels_csv = Path(labels_csv)
    entries: list[tuple[Annotation, int | None]] = [(a, None) for a in plan.new.values()]
    entries += [(a, old) for old, a in plan.relabeled.values()]
    if not entries:
        return 0
    entries.sort(key=lambda e: e[0].row)
    old = labels_csv.read_bytes() if labels_csv.exists() else b""
    if old.strip():
        header = next(csv.reader(io.StringIO(old.decode("utf-8-sig"))), [])
        if header != PROVENANCE_COLUMNS:
            raise LabelImportError(f"{labels_csv} has columns {header}, expected {PROVENANCE_COLUMNS}; "
                                   "refusing to append to a file of another layout")
        prefix = old if old.endswith(b"\n") else old + b"\n"
    else:
        prefix = ",".join(PROVENANCE_COLUMNS).encode() + b"\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PROVENANCE_COLUMNS, lineterminator="\n")
    for a, previous in entries:
        cycle = cycle_of.get(a.id)
        writer.writerow({
            "id": a.id, "label": a.label, "label_name": classes[a.label] if classes else "",
            "annotator": a.annotator or "", "cycle": "" if cycle is None else cycle,
            "query_id": query_of.get(a.id, ""), "imported_at": imported_at, "source": source,
            "supersedes": "" if previous is None else previous,
        })
    atomic_write_bytes(labels_csv, prefix + buf.getvalue().encode())
    return len(entries)


def _provenance_rows(labels_csv: Path) -> Iterable[dict[str, str]]:
    labels_csv = Path(labels_csv)
    if not labels_csv.exists():
        return []
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def label_history(labels_csv: Path, sample_id: str) -> list[dict]:
    """Every provenance row of one id, oldest first."""
    return [row for row in _provenance_rows(labels_csv) if row["id"] == sample_id]


def current_labels(labels_csv: Path) -> dict[str, int]:
    """{id: label} from the provenance log; the last row of an id wins."""
    return {row["id"]: int(row["label"]) for row in _provenance_rows(labels_csv)}
