"""Annotations read back: the answers of annotators in three formats, their votes and conflict
policies, and what an import of them would change.

Plain Python (stdlib csv/json only), no orchestration imports: the import transaction
(`tidal.labeling.imports`) calls these with plain values (ids, dicts), so every rule here is
testable without a workspace.

- `read_annotations` reads a query file back (csv, jsonl, `query_labelstudio.json`, or Label
  Studio's own JSON export) into `Annotations`; every bad input is a `LabelImportError` naming the
  file, the row and what to do. Nothing is written while reading. Several answers for one id
  (Label Studio annotations of one task by several annotators, or repeated csv/jsonl rows) are
  votes; when they disagree, the `conflicts` policy decides (`CONFLICT_POLICIES`): refuse the id
  (it stays pending), take the newest answer, or take the majority (a tie is refused). The
  decision is kept on each `Annotation` (`decided_by`, `others`) and every disagreement in
  `Annotations.conflicts`.
- `check_against_state` decides what an import would change (`ImportPlan`) or refuses it.
"""
from __future__ import annotations

import csv
import io
import json
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidal.labeling.queries import LABELSTUDIO_CONFIG
from tidal.workspace import restore_cell

FORMATS = ("csv", "jsonl", "label-studio")
CONFLICT_POLICIES = ("refuse", "newest", "majority")
_SHOW = 5  # ids shown in an error message before "... and N more"


class LabelImportError(ValueError):
    """Annotations that cannot be imported; the message names the file/row and what to do."""


@dataclass
class Vote:
    """One answer for one id: a csv/jsonl row, or one non-cancelled Label Studio annotation."""
    annotator: str | None
    label: int                 # class index
    row: int                   # as Annotation.row
    when: str = ""             # Label Studio updated_at (else created_at); "" for csv/jsonl


@dataclass
class Annotation:
    id: str
    label: int                 # class index
    annotator: str | None
    row: int                   # csv/jsonl: line number (csv header = line 1); label-studio: task number (1-based)
    # "single" (one answer), "unanimous" (several, all the same label), or the policy that chose
    # this label among disagreeing answers: "newest" or "majority".
    decided_by: str = "single"
    others: list[Vote] = field(default_factory=list)  # the id's other answers (agreeing and outvoted)


@dataclass
class Conflict:
    """Answers for one id that disagree, and what the policy made of them."""
    id: str
    votes: list[Vote]          # every answer, in file order
    label: int | None          # the label the policy chose; None: refused, the id stays pending

    def describe(self, classes: list[str] | None = None, fmt: str = "") -> str:
        """e.g. "s0 (alice: cat (line 2), bob: dog (line 5); refused)"."""
        def name(label: int) -> str:
            return classes[label] if classes and 0 <= label < len(classes) else str(label)

        where = "task #" if fmt == "label-studio" else "line "
        answers = ", ".join(f"{v.annotator or '?'}: {name(v.label)} ({where}{v.row})" for v in self.votes)
        outcome = "refused" if self.label is None else f"took {name(self.label)}"
        return f"{self.id} ({answers}; {outcome})"


@dataclass
class Annotations:
    experiment: str | None
    query_id: str | None
    cycle: int | None
    labels: list[Annotation]
    skipped: list[str]         # ids left without a label (empty label, skipped/cancelled task)
    source: str                # the file read
    conflicts: list[Conflict] = field(default_factory=list)  # ids whose answers disagree, in file order
    policy: str = "refuse"     # the conflicts policy applied
    fmt: str = ""              # the format read (csv, jsonl, label-studio)

    def refused(self) -> list[str]:
        """Ids not imported because their answers disagree (they stay pending)."""
        return [c.id for c in self.conflicts if c.label is None]

    def conflict_report(self, classes: list[str] | None = None) -> str:
        """One line naming every disagreement and what was done with it; "" when there is none."""
        if not self.conflicts:
            return ""
        refused = [c for c in self.conflicts if c.label is None]
        decided = [c for c in self.conflicts if c.label is not None]
        parts = []
        if refused:
            why = "a tie" if self.policy == "majority" else "label_conflicts=refuse"
            parts.append(f"{len(refused)} id(s) not imported, the annotators disagree ({why}; they stay "
                         f"pending): {_shorten([c.describe(classes, self.fmt) for c in refused])}")
        if decided:
            parts.append(f"{len(decided)} id(s) decided by label_conflicts={self.policy}: "
                         f"{_shorten([c.describe(classes, self.fmt) for c in decided])}")
        return f"{self.source}: " + "; ".join(parts)


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


# --- reading ------------------------------------------------------------------------------

def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


_brief = reprlib.Repr()
_brief.maxstring, _brief.maxother, _brief.maxlevel, _brief.maxlist, _brief.maxdict = 120, 120, 3, 12, 6


def _show(value: Any) -> str:
    """repr() for messages, bounded: a value from a file may be huge or nested a thousand deep."""
    return _brief.repr(value)


def _where(source: str, fmt: str, row: int) -> str:
    return f"{source} task #{row}" if fmt == "label-studio" else f"{source} line {row}"


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


class _Collector:
    """Accumulates the rows of one file, enforces the per-file rules, and decides each id's label
    from its votes (every non-empty answer) under the conflicts policy."""

    def __init__(self, source: str, fmt: str, classes: list[str], conflicts: str = "refuse") -> None:
        self.source, self.fmt, self.classes, self.policy = source, fmt, classes, conflicts
        self.index = {c: i for i, c in enumerate(classes)}
        self.seen: dict[str, int] = {}       # id -> first row, in file order
        self.votes: dict[str, list[Vote]] = {}
        self.meta: dict[str, dict[Any, int]] = {"experiment": {}, "query_id": {}, "cycle": {}}
        self.n_rows = 0

    def fail(self, row: int, msg: str) -> LabelImportError:
        return LabelImportError(f"{_where(self.source, self.fmt, row)}: {msg}")

    def _text(self, row: int, what: str, value: Any) -> str:
        """A string value of the file (id, annotator, experiment, query id), stripped."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.fail(row, f"{what} {_show(value)} must be a string (or an integer), not "
                                 f"{type(value).__name__}")
        text = str(value).strip()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(row, f"{what} {_show(value)} holds a lone UTF-16 surrogate (a broken \\u escape), "
                                 "which is not text; fix it and import again") from None
        return text

    def add(self, row: int, sample_id: Any, votes: list[tuple[Any, Any, str]], experiment: Any = None,
            query_id: Any = None, cycle: Any = None) -> None:
        """One row (csv/jsonl line, Label Studio task) of one id; votes: (label, annotator, when) answers,
        where an empty label is no answer."""
        self.n_rows += 1
        if _is_blank(sample_id):
            raise self.fail(row, "the sample id is empty; every row must keep the id it was exported with")
        sid = self._text(row, "the sample id", sample_id)
        self.seen.setdefault(sid, row)
        for key, value in (("experiment", experiment), ("query_id", query_id), ("cycle", cycle)):
            if _is_blank(value):
                continue
            if key == "cycle":
                try:
                    if isinstance(value, bool) or not isinstance(value, (str, int)):
                        raise ValueError
                    value = int(str(value).strip())
                except ValueError:
                    raise self.fail(row, f"cycle {_show(value)} is not an integer") from None
            else:
                value = self._text(row, key, value)
            self.meta[key].setdefault(value, row)
        for label, annotator, when in votes:
            if _is_blank(label):
                continue
            if not isinstance(label, str):
                raise self.fail(row, f"label {_show(label)} for id {sid!r} must be a class name (a string), one of "
                                     f"{self.classes}")
            name = label.strip()
            if name not in self.index:
                raise self.fail(row, f"label {_show(name)} for id {sid!r} is not one of the classes {self.classes}; "
                                     "fix the label (names are case-sensitive) and import again")
            who = None if _is_blank(annotator) else self._text(row, "annotator", annotator)
            self.votes.setdefault(sid, []).append(Vote(who, self.index[name], row, when))

    def _decide(self, sid: str, votes: list[Vote]) -> tuple[Annotation | None, Conflict | None]:
        newest = max(range(len(votes)), key=lambda i: (votes[i].when, i))  # ties: the later answer in the file
        labels = {v.label for v in votes}
        if len(labels) == 1:
            winner, decided_by, conflict = votes[newest], "single" if len(votes) == 1 else "unanimous", None
        elif self.policy == "refuse":
            return None, Conflict(sid, votes, None)
        elif self.policy == "newest":
            winner, decided_by = votes[newest], "newest"
        else:  # majority
            counts = Counter(v.label for v in votes).most_common()
            if len(counts) > 1 and counts[0][1] == counts[1][1]:
                return None, Conflict(sid, votes, None)
            top = counts[0][0]
            winner = votes[max((i for i, v in enumerate(votes) if v.label == top), key=lambda i: (votes[i].when, i))]
            decided_by = "majority"
        if len(labels) > 1:
            conflict = Conflict(sid, votes, winner.label)
        others = [v for v in votes if v is not winner]
        return Annotation(sid, winner.label, winner.annotator, winner.row, decided_by, others), conflict

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
        labels, skipped, conflicts = [], [], []
        for sid in self.seen:
            votes = self.votes.get(sid)
            if not votes:
                skipped.append(sid)
                continue
            ann, conflict = self._decide(sid, votes)
            if ann is not None:
                labels.append(ann)
            if conflict is not None:
                conflicts.append(conflict)
        return Annotations(values["experiment"], values["query_id"], values["cycle"], labels, skipped,
                           self.source, conflicts, self.policy, self.fmt)


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "label-studio"}.get(suffix)
    if fmt is None:
        raise LabelImportError(f"cannot tell the format of {path} from its extension {suffix or '(none)'!r}; "
                               f"pass --format with one of {', '.join(FORMATS)}")
    return fmt


_UTF16_32_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
                  b"\xfe\xff": "UTF-16"}


def _decode(path: Path, raw: bytes) -> str:
    for bom, name in _UTF16_32_BOMS.items():
        if raw.startswith(bom):
            raise LabelImportError(f"{path} is {name} text (it starts with a {name} byte-order mark); "
                                   "save it as UTF-8 and import again")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelImportError(f"{path} is not UTF-8 text ({err}); save it as UTF-8 and import again") from None
    if "\x00" in text:
        line = len(_LINE_END.findall(text, 0, text.index("\x00"))) + 1
        raise LabelImportError(f"{path} line {line} holds a NUL byte, which no text file has (is it UTF-16 "
                               "without a byte-order mark, or not a text file?); save it as UTF-8 and import again")
    return text


def read_annotations(path: Path, classes: list[str], fmt: str | None = None,
                     conflicts: str = "refuse") -> Annotations:
    """Read filled-in annotations (csv, jsonl, or Label Studio JSON); raises LabelImportError.

    conflicts: what to do with an id whose answers disagree (`CONFLICT_POLICIES`): "refuse" (not
    imported, it stays pending), "newest" (the newest answer wins: Label Studio's updated_at, else
    the later row) or "majority" (the most frequent label wins; a tie is refused). Cancelled Label
    Studio annotations and empty answers are no votes.
    """
    path = Path(path)
    if conflicts not in CONFLICT_POLICIES:
        raise LabelImportError(f"unknown label conflicts policy {conflicts!r}; use one of "
                               f"{', '.join(CONFLICT_POLICIES)}")
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
    text = _decode(path, raw)
    col = _Collector(str(path), fmt, list(classes), conflicts)
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
        raise LabelImportError(f"{col.source}: missing column(s) {missing}; found columns {_show(header)}; the "
                               "file needs at least `id` and `label` (export the query again, or use --format if "
                               "this is not a csv)")
    pos = {name: i for i, name in reversed(list(enumerate(header)))}  # first occurrence wins

    def cell(values: list[str], name: str) -> str | None:
        i = pos.get(name)
        return restore_cell(values[i]) if i is not None and i < len(values) else None

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
        col.add(line, cell(values, "id"), [(cell(values, "label"), cell(values, "annotator"), "")],
                cell(values, "experiment"), cell(values, "query_id"), cell(values, "cycle"))


def _loads(text: str) -> Any:
    """json.loads; ValueError (malformed, or an integer of more than 4300 digits) or RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_LINE_END = re.compile(r"\r\n|\r|\n")  # not str.splitlines(): U+2028, U+0085 ... may stand inside a JSON string


def _read_jsonl(text: str, col: _Collector) -> None:
    seen_label_key = False
    keys_found: set[str] = set()
    for n, line in enumerate(_LINE_END.split(text), start=1):
        if not line.strip():
            continue
        try:
            obj = _loads(line)
        except ValueError as err:
            raise col.fail(n, f"malformed JSON ({err}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise col.fail(n, f"expected a JSON object, found {type(obj).__name__}")
        keys_found.update(obj)
        if "id" not in obj:
            raise col.fail(n, f"no `id` key (found keys {_show(sorted(obj))}); keep the id each row was exported "
                              "with")
        seen_label_key = seen_label_key or "label" in obj
        col.add(n, obj.get("id"), [(obj.get("label"), obj.get("annotator"), "")], obj.get("experiment"),
                obj.get("query_id"), obj.get("cycle"))
    if col.n_rows and not seen_label_key:
        raise LabelImportError(f"{col.source}: no line has a `label` key (found keys {_show(sorted(keys_found))}); "
                               "add \"label\": \"<class name>\" to each answered line")


def _annotator(completed_by: Any) -> Any:
    if isinstance(completed_by, dict):
        return completed_by.get("email") or completed_by.get("username") or completed_by.get("id")
    return completed_by


def _choice(result: list, col: _Collector, n: int) -> Any:
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
        tasks = _loads(text)
    except ValueError as err:
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
            raise col.fail(n, f"task data has no `sample_id` (found {_show(sorted(data))}); import tasks from "
                              "query_labelstudio.json so each keeps its sample id")
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise col.fail(n, "`annotations` must be a list")
        votes = []
        for a in annotations:  # every submitted annotation is a vote; cancelled (skipped) ones are not
            if not isinstance(a, dict) or a.get("was_cancelled"):
                continue
            result = a.get("result")
            if not result:  # submitted empty: no answer
                continue
            if not isinstance(result, list):
                raise col.fail(n, "the annotation's `result` must be a list")
            when = a.get("updated_at") or a.get("created_at") or ""
            votes.append((_choice(result, col, n), _annotator(a.get("completed_by")),
                          when if isinstance(when, str) else _show(when)))
        col.add(n, data.get("sample_id"), votes, data.get("experiment"), data.get("query_id"), data.get("cycle"))


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
