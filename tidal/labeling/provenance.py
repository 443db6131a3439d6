"""The append-only provenance log of human labels, `data/labels/<experiment>.csv`: who labelled
what, when, from which file, and the rule that decided it.

Plain Python (stdlib csv/json only), no orchestration imports.

- `append_provenance` appends one row per new/changed label of an `ImportPlan` (old bytes + new
  rows, written atomically), with the policy that decided it and the other annotators' labels.
- `provenance_rows`, `label_history` and `current_labels` read it back.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tidal.labeling.annotations import Annotation, ImportPlan, LabelImportError, _show
from tidal.workspace import atomic_write_bytes, csv_rows, restore_cell

PROVENANCE_COLUMNS = ["id", "label", "label_name", "annotator", "cycle", "query_id", "imported_at", "source",
                      "supersedes", "decided_by", "other_labels"]


def _other_labels(a: Annotation, classes: list[str] | None) -> str:
    """The id's other answers as compact JSON: [{"annotator": ..., "label": ..., "label_name": ...}]."""
    if not a.others:
        return ""
    return json.dumps([{"annotator": v.annotator, "label": v.label,
                        **({"label_name": classes[v.label]} if classes else {})} for v in a.others],
                      ensure_ascii=False, separators=(",", ":"))


def _log_header(labels_csv: Path, old: bytes) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(old.decode("utf-8-sig"), newline="")), [])
    except UnicodeDecodeError as err:
        raise LabelImportError(f"{labels_csv} is not UTF-8 text ({err}); refusing to append to it; restore it "
                               "from its DVC-pinned version (dvc checkout) and import again") from None
    except csv.Error as err:
        raise LabelImportError(f"{labels_csv} line 1 is unreadable csv ({err}); refusing to append to it; "
                               "restore it from its DVC-pinned version (dvc checkout) and import again") from None


def append_provenance(labels_csv: Path, plan: ImportPlan, *, cycle_of: dict[str, int], query_of: dict[str, str],
                      source: str, imported_at: str, classes: list[str] | None = None, dry_run: bool = False) -> int:
    """Append one row per new/relabeled id to labels_csv (old bytes + new rows, atomically); returns rows added.

    dry_run: make every check below and return the rows it would add, writing nothing (so a caller
    can refuse an import before it writes anything else).

    A log of another layout than `PROVENANCE_COLUMNS`, a file that is not UTF-8 csv, one whose rows
    do not read back (`current_labels`), or one that would not read back as its old labels plus the
    new ones (a last row cut inside a quoted value) is refused with LabelImportError and left
    byte-identical.
    """
    labels_csv = Path(labels_csv)
    entries: list[tuple[Annotation, int | None]] = [(a, None) for a in plan.new.values()]
    entries += [(a, old) for old, a in plan.relabeled.values()]
    if not entries:
        return 0
    entries.sort(key=lambda e: e[0].row)
    old = labels_csv.read_bytes() if labels_csv.exists() else b""
    before: dict[str, int] = {}
    if old.strip():
        header = _log_header(labels_csv, old)
        if header != PROVENANCE_COLUMNS:
            raise LabelImportError(f"{labels_csv} has columns {_show(header)}, expected {PROVENANCE_COLUMNS}; "
                                   "refusing to append to a file of another layout")
        before = current_labels(labels_csv)  # a log whose rows do not read back is refused, not appended to
        prefix = old if old.endswith((b"\n", b"\r")) else old + b"\n"
    else:
        prefix = ",".join(PROVENANCE_COLUMNS).encode() + b"\n"
    rows = []
    for a, previous in entries:
        cycle = cycle_of.get(a.id)
        rows.append({
            "id": a.id, "label": a.label, "label_name": classes[a.label] if classes else "",
            "annotator": a.annotator or "", "cycle": "" if cycle is None else cycle,
            "query_id": query_of.get(a.id, ""), "imported_at": imported_at, "source": source,
            "supersedes": "" if previous is None else previous, "decided_by": a.decided_by,
            "other_labels": _other_labels(a, classes),
        })
    try:
        data = prefix + csv_rows(PROVENANCE_COLUMNS, rows).encode()
    except UnicodeEncodeError as err:  # only from hand-built plans: read_annotations refuses such text
        raise LabelImportError(f"cannot write {labels_csv}: a value is not text ({err})") from None
    if _labels_of(_parse_log(data.decode("utf-8-sig"), labels_csv), labels_csv) != {**before, **plan.updates()}:
        raise LabelImportError(f"{labels_csv} would not read back as its labels plus the new ones (is its last row "
                               "cut inside a quoted value?); refusing to append to it; restore it from its "
                               "DVC-pinned version (dvc checkout) and import again")
    if not dry_run:
        atomic_write_bytes(labels_csv, data)
    return len(entries)


def _log_rows(labels_csv: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every row of the log; see `_parse_log`."""
    labels_csv = Path(labels_csv)
    if not labels_csv.exists():
        return []
    try:
        text = labels_csv.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelImportError(f"{labels_csv} is not UTF-8 text ({err}); restore it from its DVC-pinned "
                               "version (dvc checkout)") from None
    return _parse_log(text, labels_csv)


def _parse_log(text: str, labels_csv: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every row; columns a row lacks (a hand-edited log) read as ""."""
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            rows.append((reader.line_num, row))  # the line the row ends on
        columns = list(reader.fieldnames or [])
    except csv.Error as err:
        raise LabelImportError(f"{labels_csv} line {reader.reader.line_num} is unreadable csv ({err}); restore "
                               "it from its DVC-pinned version (dvc checkout)") from None
    missing = [c for c in ("id", "label") if c not in columns]
    if rows and missing:
        raise LabelImportError(f"{labels_csv} has no {missing} column(s) (found {_show(columns)}); it is not a "
                               "label provenance log")
    for _, row in rows:
        row.pop(None, None)  # extra fields of a hand-edited row
        for key in PROVENANCE_COLUMNS:
            row[key] = "" if row.get(key) is None else restore_cell(row[key])
    return rows


def _labels_of(rows: list[tuple[int, dict[str, str]]], labels_csv: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line, row in rows:
        try:
            out[row["id"]] = int(row["label"])
        except ValueError:
            raise LabelImportError(f"{labels_csv} line {line}: the label {_show(row['label'])} of id "
                                   f"{_show(row['id'])} is not a class number; restore the file from its "
                                   "DVC-pinned version (dvc checkout)") from None
    return out


def provenance_rows(labels_csv: Path) -> list[dict[str, str]]:
    """Every row of the provenance log, oldest first."""
    return [row for _, row in _log_rows(labels_csv)]


def label_history(labels_csv: Path, sample_id: str) -> list[dict]:
    """Every provenance row of one id, oldest first."""
    return [row for row in provenance_rows(labels_csv) if row["id"] == sample_id]


def current_labels(labels_csv: Path) -> dict[str, int]:
    """{id: label} from the provenance log; the last row of an id wins."""
    return _labels_of(_log_rows(labels_csv), labels_csv)
