"""tidal.labeling: query export, annotation import (csv/jsonl/Label Studio), checks, provenance log."""
from __future__ import annotations

import csv
import json

import pytest

from tidal.labeling.annotations import (Annotation, Annotations, ImportPlan, LabelImportError, Vote,
                                       check_against_state, read_annotations)
from tidal.labeling.provenance import PROVENANCE_COLUMNS, append_provenance, current_labels, label_history
from tidal.labeling.queries import export_query_files

CLASSES = ["cat", "dog", "bird"]
EXP = "exp1"


def _rows(n=4):
    return [{"id": f"s{i}", "path": f"img/s{i}.png" if i % 2 else "", "score": 0.5 + i / 10, "rank": i + 1,
             "suggested_label": i % 3, "confidence": i / 4} for i in range(n)]


@pytest.fixture
def exported(tmp_path):
    return export_query_files(tmp_path / "out", EXP, 2, "q-2", _rows(), CLASSES)


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def _fill_csv(src, dst, answers):
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"] = answers.get(r["id"], "")
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dst


# --- export ---------------------------------------------------------------------------------

def test_export_writes_three_formats_and_config(exported, tmp_path):
    assert set(exported) == {"csv", "jsonl", "label-studio"}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["labelstudio_config.xml", "query.csv", "query.jsonl",
                                                     "query_labelstudio.json"]
    with open(exported["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["experiment", "cycle", "query_id", "id", "path", "score", "rank",
                             "suggested_label", "label"]
    assert [r["suggested_label"] for r in rows] == ["cat", "dog", "bird", "cat"]
    assert all(r["label"] == "" and r["experiment"] == EXP and r["cycle"] == "2" for r in rows)
    assert float(rows[1]["score"]) == 0.6 and rows[1]["path"] == "img/s1.png" and rows[0]["path"] == ""

    lines = [json.loads(l) for l in open(exported["jsonl"])]
    assert lines[2] == {"experiment": EXP, "cycle": 2, "query_id": "q-2", "id": "s2", "path": "",
                        "score": 0.7, "rank": 3, "suggested_label": "bird", "label": None}

    tasks = json.loads(open(exported["label-studio"]).read())
    assert tasks[1]["data"] == {"image": "img/s1.png", "sample_id": "s1", "experiment": EXP, "cycle": 2,
                                "query_id": "q-2", "rank": 2, "score": 0.6}
    pred = tasks[1]["predictions"][0]
    assert pred["model_version"] == "exp1-cycle2" and pred["score"] == 0.25  # the confidence, not the score
    assert pred["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                               "value": {"choices": ["dog"]}}]
    xml = (out / "labelstudio_config.xml").read_text()
    assert '<Image name="image" value="$image"/>' in xml and '<Choices name="label" toName="image"' in xml
    assert all(f'<Choice value="{c}"/>' in xml for c in CLASSES)


def test_exported_files_read_back_as_all_skipped(exported):
    for fmt, path in exported.items():
        ann = read_annotations(path, CLASSES)
        assert ann.labels == [] and ann.skipped == ["s0", "s1", "s2", "s3"], fmt
        assert (ann.experiment, ann.query_id, ann.cycle) == (EXP, "q-2", 2)


# --- round trips ----------------------------------------------------------------------------

ANSWERS = {"s0": "dog", "s1": "dog", "s2": "cat", "s3": "bird"}
EXPECTED = {"s0": 1, "s1": 1, "s2": 0, "s3": 2}


def test_roundtrip_csv(exported, tmp_path):
    path = _fill_csv(exported["csv"], tmp_path / "answers.csv", ANSWERS)
    ann = read_annotations(path, CLASSES)
    assert {a.id: a.label for a in ann.labels} == EXPECTED
    assert [a.row for a in ann.labels] == [2, 3, 4, 5]  # header is line 1
    assert (ann.experiment, ann.query_id, ann.cycle, ann.skipped) == (EXP, "q-2", 2, [])
    assert ann.source == str(path)


def test_roundtrip_csv_with_annotator_column(tmp_path):
    path = _write_csv(tmp_path / "a.csv", ["id", "label", "annotator"], [["s0", "cat", "ann@x"], ["s1", "dog", ""]])
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.label, a.annotator) for a in ann.labels] == [("s0", 0, "ann@x"), ("s1", 1, None)]
    assert (ann.experiment, ann.query_id, ann.cycle) == (None, None, None)


def test_roundtrip_jsonl(exported, tmp_path):
    lines = [json.loads(l) for l in open(exported["jsonl"])]
    for obj in lines:
        obj["label"] = ANSWERS[obj["id"]]
        obj["annotator"] = "alice"
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    ann = read_annotations(path, CLASSES)
    assert {a.id: a.label for a in ann.labels} == EXPECTED
    assert {a.annotator for a in ann.labels} == {"alice"}
    assert [a.row for a in ann.labels] == [1, 2, 3, 4]
    assert (ann.experiment, ann.query_id, ann.cycle) == (EXP, "q-2", 2)


def _ls_annotation(choice, *, cancelled=False, user=7, when="2026-01-01T10:00:00.000000Z", result=True):
    """An annotation the way Label Studio's JSON export writes it."""
    return {
        "id": 100, "completed_by": user, "was_cancelled": cancelled, "ground_truth": False,
        "created_at": when, "updated_at": when, "lead_time": 3.2, "prediction": {},
        "result": [{"id": "abc", "type": "choices", "value": {"choices": [choice]}, "origin": "manual",
                    "to_name": "image", "from_name": "label"}] if result else [],
    }


def _ls_export(exported):
    """Our tasks as Label Studio exports them after import into a project."""
    tasks = json.loads(open(exported["label-studio"]).read())
    for n, t in enumerate(tasks, start=1):
        t.update({"id": 1000 + n, "project": 3, "inner_id": n, "file_upload": "query_labelstudio.json",
                  "total_annotations": 0, "cancelled_annotations": 0, "annotations": []})
    return tasks


def test_roundtrip_labelstudio_export(exported, tmp_path):
    tasks = _ls_export(exported)
    for t in tasks:
        t["annotations"] = [_ls_annotation(ANSWERS[t["data"]["sample_id"]])]
    tasks[0]["annotations"][0]["completed_by"] = {"id": 7, "email": "bob@lab.org"}
    path = tmp_path / "project-3-export.json"
    path.write_text(json.dumps(tasks))
    ann = read_annotations(path, CLASSES)
    assert {a.id: a.label for a in ann.labels} == EXPECTED
    assert [a.annotator for a in ann.labels] == ["bob@lab.org", "7", "7", "7"]
    assert [a.row for a in ann.labels] == [1, 2, 3, 4]
    assert (ann.experiment, ann.query_id, ann.cycle, ann.skipped) == (EXP, "q-2", 2, [])


def test_labelstudio_newest_non_cancelled_annotation_wins_under_newest(exported, tmp_path):
    tasks = _ls_export(exported)
    tasks[0]["annotations"] = [_ls_annotation("cat", user=1, when="2026-01-02T00:00:00Z"),
                               _ls_annotation("bird", user=2, when="2026-01-01T00:00:00Z"),
                               _ls_annotation("dog", user=3, cancelled=True, when="2026-01-03T00:00:00Z")]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    ann = read_annotations(path, CLASSES, conflicts="newest")
    assert [(a.id, a.label, a.annotator, a.decided_by) for a in ann.labels] == [("s0", 0, "1", "newest")]
    assert ann.labels[0].others == [Vote("2", 2, 1, "2026-01-01T00:00:00Z")]  # the cancelled one is no vote


def test_labelstudio_skipped_and_cancelled_tasks(exported, tmp_path):
    tasks = _ls_export(exported)
    tasks[0]["annotations"] = [_ls_annotation("dog")]                        # answered
    tasks[1]["annotations"] = [_ls_annotation("cat", cancelled=True)]        # skipped by the annotator
    tasks[2]["annotations"] = [_ls_annotation("cat", result=False)]          # submitted empty
    del tasks[3]["annotations"]                                              # never opened
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.label) for a in ann.labels] == [("s0", 1)]
    assert ann.skipped == ["s1", "s2", "s3"]


def test_explicit_format_overrides_extension(exported, tmp_path):
    path = tmp_path / "answers.txt"
    path.write_bytes(_fill_csv(exported["csv"], tmp_path / "x.csv", ANSWERS).read_bytes())
    assert len(read_annotations(path, CLASSES, fmt="csv").labels) == 4


# --- partial returns ------------------------------------------------------------------------

def test_partial_csv_skips_unlabeled_and_keeps_them_pending(exported, tmp_path):
    path = _fill_csv(exported["csv"], tmp_path / "partial.csv", {"s0": "dog", "s3": "bird"})
    ann = read_annotations(path, CLASSES)
    assert [a.id for a in ann.labels] == ["s0", "s3"] and ann.skipped == ["s1", "s2"]
    pending = {f"s{i}": {"cycle": 2, "query_id": "q-2"} for i in range(4)}
    plan = check_against_state(ann, experiment=EXP, pool_ids={f"s{i}" for i in range(10)},
                               pending=pending, labeled={"s9": 0})
    assert sorted(plan.new) == ["s0", "s3"] and plan.still_pending == ["s1", "s2"]
    assert plan.relabeled == {} and plan.unchanged == [] and plan.updates() == {"s0": 1, "s3": 2}


# --- read errors ----------------------------------------------------------------------------

def _raises(path, match, fmt=None, classes=CLASSES):
    with pytest.raises(LabelImportError, match=match) as info:
        read_annotations(path, classes, fmt)
    return str(info.value)


@pytest.mark.parametrize("name", ["a.csv", "a.jsonl", "a.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    msg = _raises(path, "no annotations in")
    assert str(path) in msg


def test_header_only_csv_and_empty_labelstudio_list(tmp_path):
    path = _write_csv(tmp_path / "h.csv", ["id", "label"], [])
    assert str(path) in _raises(path, "no annotations in")
    ls = tmp_path / "e.json"
    ls.write_text("[]")
    _raises(ls, "no annotations in")


def test_csv_missing_columns_named(tmp_path):
    path = _write_csv(tmp_path / "a.csv", ["sample", "label", "score"], [["s0", "cat", "1"]])
    msg = _raises(path, r"missing column\(s\) \['id'\]")
    assert "found columns ['sample', 'label', 'score']" in msg and str(path) in msg
    path = _write_csv(tmp_path / "b.csv", ["id", "class"], [["s0", "cat"]])
    assert "['label']" in _raises(path, "missing column")


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "s0", "label": "cat"}\n{"id": "s1", "label": "dog"\n')
    msg = _raises(path, "line 2: malformed JSON")
    assert str(path) in msg and "Expecting" in msg  # the json error itself


def test_jsonl_without_label_key(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "s0", "class": "cat"}\n')
    assert "class" in _raises(path, "no line has a `label` key")


def test_labelstudio_malformed_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"data": {"sample_id": "s0"}, ')
    msg = _raises(path, "malformed JSON")
    assert str(path) in msg and "Expecting" in msg


def test_labelstudio_task_without_sample_id(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"data": {"sample_id": "s0"}}, {"data": {"image": "x.png"}}]))
    _raises(path, r"task #2: task data has no `sample_id`")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "label-studio"])
def test_label_not_a_class(tmp_path, fmt):
    if fmt == "csv":
        path = _write_csv(tmp_path / "a.csv", ["id", "label"], [["s0", "cat"], ["s1", "Dog"]])
        where = "line 3"
    elif fmt == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text('{"id": "s0", "label": "cat"}\n{"id": "s1", "label": "Dog"}\n')
        where = "line 2"
    else:
        path = tmp_path / "a.json"
        path.write_text(json.dumps([{"data": {"sample_id": "s0"}, "annotations": [_ls_annotation("cat")]},
                                    {"data": {"sample_id": "s1"}, "annotations": [_ls_annotation("Dog")]}]))
        where = "task #2"
    msg = _raises(path, "is not one of the classes")
    assert f"{path} {where}" in msg and "'Dog'" in msg and "['cat', 'dog', 'bird']" in msg


def test_jsonl_non_string_label(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "s0", "label": 1}\n')
    _raises(path, "line 1: label 1 for id 's0' must be a class name")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "label-studio"])
def test_repeated_id_is_one_id_with_several_answers(tmp_path, fmt):
    """A repeated row (task) of one id is more answers for it, not an error; empty ones are no answers."""
    if fmt == "csv":
        path = _write_csv(tmp_path / "a.csv", ["id", "label"], [["s0", "cat"], ["s1", ""], ["s0", ""], ["s1", ""]])
    elif fmt == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text('{"id": "s0", "label": "cat"}\n{"id": "s1", "label": null}\n{"id": "s0", "label": null}\n'
                        '{"id": "s1"}\n')
    else:
        path = tmp_path / "a.json"
        path.write_text(json.dumps([{"data": {"sample_id": "s0"}, "annotations": [_ls_annotation("cat")]},
                                    {"data": {"sample_id": "s1"}}, {"data": {"sample_id": "s0"}},
                                    {"data": {"sample_id": "s1"}}]))
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.label, a.decided_by, a.others) for a in ann.labels] == [("s0", 0, "single", [])]
    assert ann.skipped == ["s1"] and ann.conflicts == []


@pytest.mark.parametrize("column,values", [("experiment", ["exp1", "exp2"]), ("query_id", ["q-1", "q-2"]),
                                           ("cycle", ["1", "2"])])
def test_mixed_experiment_query_or_cycle(tmp_path, column, values):
    path = _write_csv(tmp_path / "a.csv", ["id", column, "label"],
                      [["s0", values[0], "cat"], ["s1", values[1], "dog"]])
    msg = _raises(path, f"mixes several {column} values")
    assert "line 2" in msg and "line 3" in msg and str(path) in msg


def test_mixed_experiments_labelstudio(exported, tmp_path):
    tasks = _ls_export(exported)
    tasks[2]["data"]["experiment"] = "other"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(tasks))
    msg = _raises(path, "mixes several experiment values")
    assert "'other' (" in msg and "task #3" in msg


def test_unknown_format(tmp_path):
    path = tmp_path / "answers.xlsx"
    path.write_bytes(b"PK\x03\x04")
    msg = _raises(path, "pass --format")
    assert ".xlsx" in msg and "csv, jsonl, label-studio" in msg
    _raises(tmp_path / "a.csv", "unknown format 'xml'", fmt="xml")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.csv", "no such annotations file")


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,label\ns0,cat\ns1,dog,extra\n")
    _raises(path, "line 3: 3 fields but the header has 2")


# --- checks against the experiment ----------------------------------------------------------

def _ann(pairs, experiment=EXP, source="answers.csv"):
    labels = [Annotation(i, lab, None, n) for n, (i, lab) in enumerate(pairs, start=2)]
    return Annotations(experiment, "q-2", 2, labels, [], source)


POOL = {f"s{i}" for i in range(20)}
PENDING = {"s0": {"cycle": 2, "query_id": "q-2"}, "s1": {"cycle": 2, "query_id": "q-2"}}


def test_check_other_experiment():
    with pytest.raises(LabelImportError, match="query file from another experiment") as info:
        check_against_state(_ann([("s0", 1)], experiment="exp9"), experiment=EXP, pool_ids=POOL,
                            pending=PENDING, labeled={})
    assert "'exp9'" in str(info.value) and "'exp1'" in str(info.value)


def test_check_unknown_ids_shows_five_and_count():
    ann = _ann([(f"x{i}", 0) for i in range(8)])
    with pytest.raises(LabelImportError, match="8 id\\(s\\) not in the experiment's pool") as info:
        check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled={})
    msg = str(info.value)
    assert "x0, x1, x2, x3, x4 ... and 3 more" in msg and "x5" not in msg


def test_check_not_pending_needs_force():
    ann = _ann([("s0", 1), ("s5", 2)])
    with pytest.raises(LabelImportError, match="not waiting for a label: s5") as info:
        check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled={})
    assert "--force" in str(info.value)
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled={}, force=True)
    assert sorted(plan.new) == ["s0", "s5"] and plan.still_pending == ["s1"]


def test_check_conflict_needs_relabel_and_same_label_is_unchanged():
    ann = _ann([("s0", 1), ("s7", 2), ("s8", 0)])
    labeled = {"s7": 1, "s8": 0}
    with pytest.raises(LabelImportError, match="already labeled differently") as info:
        check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled=labeled)
    msg = str(info.value)
    assert "s7 (labeled 1, file says 2)" in msg and "--relabel" in msg and "s8" not in msg
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled=labeled, relabel=True)
    assert list(plan.new) == ["s0"] and plan.unchanged == ["s8"]
    old, a = plan.relabeled["s7"]
    assert old == 1 and a.label == 2 and plan.updates() == {"s0": 1, "s7": 2}


def test_check_reimport_of_same_file_is_a_noop():
    ann = _ann([("s0", 1), ("s1", 2)])
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending={}, labeled={"s0": 1, "s1": 2})
    assert plan.new == {} and plan.relabeled == {} and plan.unchanged == ["s0", "s1"] and plan.still_pending == []


def test_check_file_without_experiment_is_accepted():
    plan = check_against_state(_ann([("s0", 1)], experiment=None), experiment=EXP, pool_ids=POOL,
                               pending=PENDING, labeled={})
    assert list(plan.new) == ["s0"]


def test_failing_read_or_check_writes_nothing(exported, tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", ["id", "label"], [["s0", "cat"], ["s1", "wolf"]])
    conflict = _fill_csv(exported["csv"], tmp_path / "good.csv", ANSWERS)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(",".join(PROVENANCE_COLUMNS) + "\ns0,0,cat,,1,q-1,t0,f,\n")
    before = _snapshot(tmp_path)
    with pytest.raises(LabelImportError):
        read_annotations(bad, CLASSES)
    ann = read_annotations(conflict, CLASSES)
    with pytest.raises(LabelImportError):
        check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled=current_labels(labels_csv))
    with pytest.raises(LabelImportError):
        check_against_state(ann, experiment="other", pool_ids=POOL, pending=PENDING, labeled={})
    assert _snapshot(tmp_path) == before


# --- provenance log -------------------------------------------------------------------------

def _plan(new=(), relabeled=()):
    return ImportPlan(new={i: Annotation(i, lab, who, n) for n, (i, lab, who) in enumerate(new, start=2)},
                      relabeled={i: (old, Annotation(i, lab, None, 100 + n))
                                 for n, (i, old, lab) in enumerate(relabeled)})


def test_provenance_append_only_and_history(tmp_path):
    log = tmp_path / "ws" / "labels.csv"
    n = append_provenance(log, _plan(new=[("s0", 1, "alice"), ("s1", 2, None)]), cycle_of={"s0": 1, "s1": 1},
                          query_of={"s0": "q-1", "s1": "q-1"}, source="a.csv", imported_at="2026-01-01T00:00:00Z",
                          classes=CLASSES)
    assert n == 2
    first = log.read_bytes()
    assert first.startswith((",".join(PROVENANCE_COLUMNS) + "\n").encode())
    assert current_labels(log) == {"s0": 1, "s1": 2}

    n = append_provenance(log, _plan(new=[("s2", 0, None)], relabeled=[("s0", 1, 2)]),
                          cycle_of={"s0": 1, "s2": 2}, query_of={"s0": "q-1", "s2": "q-2"}, source="b.json",
                          imported_at="2026-01-02T00:00:00Z", classes=CLASSES)
    assert n == 2
    second = log.read_bytes()
    assert second.startswith(first) and len(second) > len(first)
    assert sorted(p.name for p in log.parent.iterdir()) == ["labels.csv"]  # no temp files left

    history = label_history(log, "s0")
    assert [(h["label"], h["label_name"], h["supersedes"], h["source"]) for h in history] == [
        ("1", "dog", "", "a.csv"), ("2", "bird", "1", "b.json")]
    assert history[0]["annotator"] == "alice" and history[0]["cycle"] == "1" and history[0]["query_id"] == "q-1"
    assert history[1]["imported_at"] == "2026-01-02T00:00:00Z"
    assert current_labels(log) == {"s0": 2, "s1": 2, "s2": 0}
    assert label_history(log, "nope") == []

    # unchanged-only plans append nothing and leave the file untouched
    assert append_provenance(log, ImportPlan(unchanged=["s1"]), cycle_of={}, query_of={}, source="c",
                             imported_at="t") == 0
    assert log.read_bytes() == second


def test_provenance_appends_to_file_without_trailing_newline(tmp_path):
    log = tmp_path / "labels.csv"
    old = (",".join(PROVENANCE_COLUMNS) + "\ns0,0,cat,,1,q-1,t0,f,").encode()
    log.write_bytes(old)
    append_provenance(log, _plan(new=[("s1", 1, None)]), cycle_of={}, query_of={}, source="x", imported_at="t1")
    assert log.read_bytes().startswith(old)
    assert current_labels(log) == {"s0": 0, "s1": 1}
    assert label_history(log, "s1")[0]["cycle"] == "" and label_history(log, "s1")[0]["label_name"] == ""


def test_provenance_refuses_foreign_layout(tmp_path):
    log = tmp_path / "labels.csv"
    log.write_text("id,label\ns0,1\n")
    before = log.read_bytes()
    with pytest.raises(LabelImportError, match="another layout"):
        append_provenance(log, _plan(new=[("s1", 1, None)]), cycle_of={}, query_of={}, source="x", imported_at="t")
    assert log.read_bytes() == before


def test_provenance_crash_keeps_old_file(tmp_path, monkeypatch):
    import os
    log = tmp_path / "labels.csv"
    append_provenance(log, _plan(new=[("s0", 1, None)]), cycle_of={}, query_of={}, source="x", imported_at="t")
    before = log.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        append_provenance(log, _plan(new=[("s1", 2, None)]), cycle_of={}, query_of={}, source="y", imported_at="t")
    monkeypatch.undo()
    assert log.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_full_flow_export_import_check_log(exported, tmp_path):
    path = _fill_csv(exported["csv"], tmp_path / "answers.csv", {"s0": "dog", "s1": "cat"})
    ann = read_annotations(path, CLASSES)
    pending = {f"s{i}": {"cycle": 2, "query_id": "q-2"} for i in range(4)}
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=pending, labeled={})
    log = tmp_path / "labels.csv"
    append_provenance(log, plan, cycle_of={i: p["cycle"] for i, p in pending.items()},
                      query_of={i: p["query_id"] for i, p in pending.items()}, source=ann.source,
                      imported_at="2026-01-01T00:00:00Z", classes=CLASSES)
    assert current_labels(log) == {"s0": 1, "s1": 0}
    assert plan.still_pending == ["s2", "s3"]


# --- disagreeing annotators: the label_conflicts policy --------------------------------------

def _ls_tasks(*answers):
    """One task per item: (sample id, [(choice, user, when, cancelled), ...])."""
    return [{"data": {"sample_id": sid, "experiment": EXP, "cycle": 2, "query_id": "q-2"},
             "annotations": [_ls_annotation(c, user=u, when=w, cancelled=x) for c, u, w, x in votes]}
            for sid, votes in answers]


T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"
DISAGREE = _ls_tasks(("s0", [("cat", 1, T2, False), ("dog", 2, T1, False)]),    # 1 vs 1, newest: cat
                     ("s1", [("bird", 1, T1, False)]),                             # one answer
                     ("s2", [("dog", 1, T1, False), ("dog", 2, T2, False)]),      # agree
                     ("s3", [("cat", 1, T1, False), ("cat", 2, T2, False), ("bird", 3, T3, False)]))  # 2 vs 1


def _read_ls(tmp_path, tasks, conflicts=None):
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return read_annotations(path, CLASSES, **({} if conflicts is None else {"conflicts": conflicts}))


def _decided(ann):
    return {a.id: (CLASSES[a.label], a.annotator, a.decided_by) for a in ann.labels}


def test_conflicts_refuse_is_the_default_and_keeps_the_ids_pending(tmp_path):
    ann = _read_ls(tmp_path, DISAGREE)
    assert ann.policy == "refuse"
    assert _decided(ann) == {"s1": ("bird", "1", "single"), "s2": ("dog", "2", "unanimous")}
    assert ann.refused() == ["s0", "s3"] and ann.skipped == []
    s0 = ann.conflicts[0]
    assert s0.id == "s0" and s0.label is None
    assert [(v.annotator, CLASSES[v.label], v.row) for v in s0.votes] == [("1", "cat", 1), ("2", "dog", 1)]
    report = ann.conflict_report(CLASSES)
    assert str(ann.source) in report and "2 id(s) not imported" in report and "stay pending" in report
    assert "s0 (1: cat (task #1), 2: dog (task #1); refused)" in report
    assert "s3 (1: cat (task #4), 2: cat (task #4), 3: bird (task #4); refused)" in report
    # the refused ids are not imported: still pending after the check, the others are new
    pending = {f"s{i}": {"cycle": 2, "query_id": "q-2"} for i in range(4)}
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=pending, labeled={})
    assert sorted(plan.new) == ["s1", "s2"] and plan.still_pending == ["s0", "s3"]
    assert plan.new["s2"].others == [Vote("1", 1, 3, T1)]  # the agreeing answer is kept too


def test_conflicts_newest_takes_the_newest_and_records_the_others(tmp_path):
    ann = _read_ls(tmp_path, DISAGREE, "newest")
    assert _decided(ann) == {"s0": ("cat", "1", "newest"), "s1": ("bird", "1", "single"),
                             "s2": ("dog", "2", "unanimous"), "s3": ("bird", "3", "newest")}
    assert ann.refused() == []
    assert [(c.id, c.label) for c in ann.conflicts] == [("s0", 0), ("s3", 2)]
    by_id = {a.id: a for a in ann.labels}
    assert by_id["s0"].others == [Vote("2", 1, 1, T1)]
    assert [(v.annotator, v.label) for v in by_id["s3"].others] == [("1", 0), ("2", 0)]
    assert ("2 id(s) decided by label_conflicts=newest: s0 (1: cat (task #1), 2: dog (task #1); took cat)"
            in ann.conflict_report(CLASSES))


def test_conflicts_majority_takes_the_most_frequent_label(tmp_path):
    ann = _read_ls(tmp_path, DISAGREE, "majority")
    # s3: cat twice beats the newer bird; the newest cat answer speaks for it
    assert _decided(ann)["s3"] == ("cat", "2", "majority")
    assert [(v.annotator, CLASSES[v.label]) for v in ann.labels[-1].others] == [("1", "cat"), ("3", "bird")]
    # s0: one against one is a tie: refused, even though one answer is newer
    assert "s0" not in _decided(ann) and ann.refused() == ["s0"]
    assert [(c.id, c.label) for c in ann.conflicts] == [("s0", None), ("s3", 0)]
    report = ann.conflict_report(CLASSES)
    assert "1 id(s) not imported" in report and "a tie" in report and "decided by label_conflicts=majority" in report


def test_conflicts_majority_tie_among_three_labels_is_refused(tmp_path):
    tasks = _ls_tasks(("s0", [("cat", 1, T1, False), ("dog", 2, T2, False), ("bird", 3, T3, False)]),
                      ("s1", [("cat", 1, T1, False), ("cat", 2, T1, False), ("dog", 3, T2, False),
                              ("dog", 4, T3, False)]))
    ann = _read_ls(tmp_path, tasks, "majority")
    assert ann.labels == [] and ann.refused() == ["s0", "s1"]


def test_cancelled_and_empty_annotations_are_not_votes(tmp_path):
    tasks = _ls_tasks(("s0", [("cat", 1, T1, False), ("dog", 2, T3, True)]),          # dog was skipped
                      ("s1", [("cat", 1, T1, True), ("dog", 2, T2, True)]),           # all skipped
                      ("s2", [("cat", 1, T1, False), ("dog", 2, T2, False), ("dog", 3, T3, True)]))
    tasks[0]["annotations"].append(_ls_annotation("bird", user=4, when=T3, result=False))  # submitted empty
    for policy in ("refuse", "newest", "majority"):
        ann = _read_ls(tmp_path, tasks, policy)
        assert _decided(ann)["s0"] == ("cat", "1", "single") and ann.labels[0].others == []
        assert ann.skipped == ["s1"]
        # s2: the cancelled dog does not break the cat/dog tie
        assert ("s2" in ann.refused()) == (policy in ("refuse", "majority"))
    assert _decided(_read_ls(tmp_path, tasks, "newest"))["s2"] == ("dog", "2", "newest")


def test_conflicts_unknown_policy(tmp_path):
    path = _write_csv(tmp_path / "a.csv", ["id", "label"], [["s0", "cat"]])
    with pytest.raises(LabelImportError, match="unknown label conflicts policy 'latest'; use one of refuse, newest"):
        read_annotations(path, CLASSES, conflicts="latest")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_repeated_rows_follow_the_same_policy(tmp_path, fmt):
    rows = [("s0", "cat", "ann"), ("s1", "dog", "ann"), ("s0", "dog", "bob"), ("s1", "dog", "bob"),
            ("s2", "bird", "ann"), ("s2", "cat", "bob"), ("s2", "bird", "carol"), ("s0", "", "carol")]
    if fmt == "csv":
        path = _write_csv(tmp_path / "a.csv", ["id", "label", "annotator"], [list(r) for r in rows])
        line = {"s0": 4, "s2": 8}  # header = line 1
    else:
        path = tmp_path / "a.jsonl"
        path.write_text("".join(json.dumps({"id": i, "label": lab or None, "annotator": who}) + "\n"
                                for i, lab, who in rows))
        line = {"s0": 3, "s2": 7}
    refuse = read_annotations(path, CLASSES)
    assert _decided(refuse) == {"s1": ("dog", "bob", "unanimous")}  # same label twice: imported
    assert refuse.refused() == ["s0", "s2"] and refuse.skipped == []
    assert (f"s0 (ann: 0 (line {line['s0'] - 2}), bob: 1 (line {line['s0']}); refused)"
            in refuse.conflict_report())  # without the classes: label numbers
    newest = read_annotations(path, CLASSES, conflicts="newest")  # no timestamps: the later row is newer
    assert _decided(newest) == {"s0": ("dog", "bob", "newest"), "s1": ("dog", "bob", "unanimous"),
                                "s2": ("bird", "carol", "newest")}
    assert newest.labels[0].row == line["s0"] and newest.labels[2].row == line["s2"]
    majority = read_annotations(path, CLASSES, conflicts="majority")
    assert _decided(majority) == {"s1": ("dog", "bob", "unanimous"), "s2": ("bird", "carol", "majority")}
    assert majority.refused() == ["s0"]  # cat against dog: a tie


def test_provenance_records_policy_and_other_labels(tmp_path):
    ann = _read_ls(tmp_path, DISAGREE, "majority")
    pending = {f"s{i}": {"cycle": 2, "query_id": "q-2"} for i in range(4)}
    plan = check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=pending, labeled={})
    log = tmp_path / "labels.csv"
    append_provenance(log, plan, cycle_of={i: 2 for i in plan.new}, query_of={i: "q-2" for i in plan.new},
                      source=ann.source, imported_at="t", classes=CLASSES)
    header = log.read_text().splitlines()[0]
    assert header == ",".join(PROVENANCE_COLUMNS) and header.endswith(",supersedes,decided_by,other_labels")
    rows = {r["id"]: r for r in csv.DictReader(open(log, newline=""))}
    assert sorted(rows) == ["s1", "s2", "s3"]
    assert (rows["s1"]["decided_by"], rows["s1"]["other_labels"]) == ("single", "")
    assert rows["s2"]["decided_by"] == "unanimous"
    assert json.loads(rows["s2"]["other_labels"]) == [{"annotator": "1", "label": 1, "label_name": "dog"}]
    assert (rows["s3"]["label_name"], rows["s3"]["annotator"], rows["s3"]["decided_by"]) == ("cat", "2", "majority")
    assert json.loads(rows["s3"]["other_labels"]) == [{"annotator": "1", "label": 0, "label_name": "cat"},
                                                      {"annotator": "3", "label": 2, "label_name": "bird"}]
    assert label_history(log, "s3")[0]["decided_by"] == "majority"
    assert current_labels(log) == {"s1": 2, "s2": 1, "s3": 0}


LOG = (",".join(PROVENANCE_COLUMNS) + "\r\n"
       "s0,0,cat,alice,1,q-1,2025-12-01T00:00:00Z,a.csv,,single,\r\n"
       "s1,1,dog,,1,q-1,2025-12-01T00:00:00Z,a.csv,,single,\r\n"
       "s0,2,bird,bob,1,q-1,2025-12-02T00:00:00Z,b.csv,0,single,\r\n").encode()


def test_label_conflicts_param():
    from tidal.config import CHOICES, DEFAULTS, ConfigError, load_params

    assert DEFAULTS["label_conflicts"] == "refuse" and CHOICES["label_conflicts"] == ("refuse", "newest", "majority")
    assert load_params(None, ["label_conflicts=majority"])["label_conflicts"] == "majority"
    with pytest.raises(ConfigError, match="label_conflicts"):
        load_params(None, ["label_conflicts=latest"])


# --- regressions found by tests/code/test_import_fuzz.py ------------------------------------

@pytest.mark.parametrize("name,text,where", [
    ("a.jsonl", '{"id": "s0", "label": "cat", "score": ' + "1" * 5000 + "}\n", "line 1: malformed JSON"),
    ("a.json", '[{"data": {"sample_id": "s0", "rank": ' + "1" * 5000 + "}}]", "malformed JSON"),
])
def test_json_integer_of_more_than_4300_digits_is_refused(tmp_path, name, text, where):
    """json.loads raised a bare ValueError (Python's int max-str-digits limit)."""
    path = tmp_path / name
    path.write_text(text)
    msg = _raises(path, where)
    assert str(path) in msg and "4300 digits" in msg


@pytest.mark.parametrize("name,text,where", [
    ("a.jsonl", '{"id": "s0", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1: malformed JSON"),
    ("a.json", "[" * 100_000 + "]" * 100_000, "malformed JSON"),
])
def test_json_nested_too_deep_is_refused(tmp_path, name, text, where):
    """json.loads raised RecursionError."""
    path = tmp_path / name
    path.write_text(text)
    assert "nested too deeply" in _raises(path, where)


@pytest.mark.parametrize("name,text,where", [
    ("a.jsonl", '{"id": "s0", "label": "cat", "annotator": "\\udfff"}\n', r"line 1: annotator '\\udfff' holds a lone"),
    ("b.jsonl", '{"id": "s0\\ud800", "label": "cat"}\n', "line 1: the sample id 's0\\\\ud800' holds a lone"),
    ("c.jsonl", '{"id": "s0", "label": "cat", "query_id": "q\\ud800"}\n', "line 1: query_id"),
    ("d.json", json.dumps([{"data": {"sample_id": "s0"}, "annotations": [_ls_annotation("cat", user="\ud800")]}]),
     "task #1: annotator"),
])
def test_lone_surrogate_is_refused_while_reading(tmp_path, name, text, where):
    """A \\udXXX escape was accepted, then append_provenance crashed with UnicodeEncodeError."""
    path = tmp_path / name
    path.write_text(text)
    assert "surrogate" in _raises(path, where)


def test_values_with_carriage_returns_survive_the_provenance_log(tmp_path):
    """csv's minimal quoting left a lone \\r bare, so the log split the row; current_labels then crashed."""
    path = tmp_path / "a.csv"
    path.write_bytes(b'id,label,annotator\ns0,cat,"Ann\rSmith"\n"s\r1",dog,\n')
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.annotator) for a in ann.labels] == [("s0", "Ann\rSmith"), ("s\r1", None)]
    plan = check_against_state(ann, experiment=EXP, pool_ids={"s0", "s\r1"}, pending={}, labeled={}, force=True)
    log = tmp_path / "labels.csv"
    append_provenance(log, plan, cycle_of={}, query_of={}, source="a\rb.csv", imported_at="t", classes=CLASSES)
    assert current_labels(log) == {"s0": 0, "s\r1": 1}
    assert label_history(log, "s0")[0]["annotator"] == "Ann\rSmith"
    assert label_history(log, "s\r1")[0]["source"] == "a\rb.csv"
    # the query export quotes them the same way
    out = export_query_files(tmp_path / "q", EXP, 1, "q-1", [{"id": "s\r1", "score": 0.5, "rank": 1}], CLASSES)
    assert read_annotations(out["csv"], CLASSES).skipped == ["s\r1"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x1c", "\x0b", "\x0c"])
def test_jsonl_line_separators_inside_a_string_are_text(tmp_path, char):
    """str.splitlines() split a line at U+2028, U+0085 ... that json.dumps(ensure_ascii=False) leaves raw."""
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "s0", "label": "cat", "annotator": f"a{char}b"}, ensure_ascii=False) + "\n"
                    + json.dumps({"id": "s1", "label": "dog"}) + "\r" + json.dumps({"id": "s2", "label": "dog"}))
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.annotator, a.row) for a in ann.labels] == [("s0", f"a{char}b", 1), ("s1", None, 2),
                                                                ("s2", None, 3)]


@pytest.mark.parametrize("value,kind", [("1.5", "float"), ("true", "bool"), ('["s0"]', "list"),
                                        ('{"id": "s0"}', "dict")])
def test_id_that_is_not_a_string_is_refused(tmp_path, value, kind):
    path = tmp_path / "a.jsonl"
    path.write_text(f'{{"id": {value}, "label": "cat"}}\n')
    assert f"must be a string (or an integer), not {kind}" in _raises(path, "line 1: the sample id")
    path.write_text('{"id": 7, "label": "cat"}\n')
    assert [a.id for a in read_annotations(path, CLASSES).labels] == ["7"]


@pytest.mark.parametrize("encoding,match", [("utf-16", "is UTF-16 text"), ("utf-32", "is UTF-32 text"),
                                            ("utf-16-le", "line 1 holds a NUL byte")])
def test_utf16_and_utf32_files_are_named(tmp_path, encoding, match):
    path = tmp_path / "a.csv"
    path.write_bytes("id,label\ns0,cat\n".encode(encoding))
    assert "save it as UTF-8" in _raises(path, match)


@pytest.mark.parametrize("content,match", [
    (b"id,label\ns0,\xff\n", "is not UTF-8 text"),
    (b"id,label\ns0,cat\n", r"line 2: the label 'cat' of id 's0' is not a class number"),
    (b"id,label\ns0,1\ns1\n", "line 3: the label '' of id 's1'"),
    (b"sample,label\ns0,1\n", r"has no \['id'\] column"),
    (b'id,label\ns0,"1' + b"1" * 200_000 + b'"\n', "line 2 is unreadable csv"),
])
def test_damaged_provenance_log_is_a_label_import_error_and_is_not_appended_to(tmp_path, content, match):
    """current_labels raised UnicodeDecodeError / ValueError / KeyError, and append_provenance appended
    to a log that did not read back."""
    log = tmp_path / "labels.csv"
    log.write_bytes(content)
    with pytest.raises(LabelImportError, match=match) as info:
        current_labels(log)
    assert str(log) in str(info.value)
    with pytest.raises(LabelImportError):
        append_provenance(log, _plan(new=[("s5", 1, None)]), cycle_of={}, query_of={}, source="x", imported_at="t")
    assert log.read_bytes() == content


@pytest.mark.parametrize("content", [b"\xff\xfeid\x00", b'"id,label\n', b"id,label,label_name\ns0,1,dog\n"])
def test_append_refuses_a_log_it_cannot_read_and_leaves_it_byte_identical(tmp_path, content):
    log = tmp_path / "labels.csv"
    log.write_bytes(content)
    with pytest.raises(LabelImportError, match="refusing to append"):
        append_provenance(log, _plan(new=[("s5", 1, None)]), cycle_of={}, query_of={}, source="x", imported_at="t")
    assert log.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


REFUSED_FILES = [
    ("a.csv", b"id;label\ns0;cat\n"), ("b.csv", b"id,label\ns0,wolf\n"), ("c.csv", b"id,label\n,cat\n"),
    ("d.csv", "id,label\ns0,cat\n".encode("utf-16")), ("e.csv", b"id,label\ns0,caf\xe9\n"),
    ("f.jsonl", b'{"id": "s0", "label": "cat"'), ("g.jsonl", b'["s0", "cat"]\n'), ("h.jsonl", b'{"id": null}\n'),
    ("i.json", b'{"data": []}'), ("j.json", b'[{"data": {"sample_id": "s0"}, "annotations": {"a": 1}}]'),
    ("k.json", json.dumps([{"data": {"sample_id": "s0"}, "annotations": [_ls_annotation(5)]}]).encode()),
    ("l.json", b"[" * 5000),
]


@pytest.mark.parametrize("name,content", REFUSED_FILES)
def test_a_refused_file_reaches_no_writer(tmp_path, monkeypatch, name, content):
    """Reading and checking never write: a refused file cannot reach append_provenance or any other
    writer of tidal.labeling, and the log and the workspace stay byte-identical."""
    from tidal.labeling import provenance, queries

    def no_write(*args, **kwargs):
        raise AssertionError("a writer was called while reading or checking annotations")

    monkeypatch.setattr(queries, "atomic_write_bytes", no_write)
    monkeypatch.setattr(queries, "atomic_write_text", no_write)
    monkeypatch.setattr(provenance, "atomic_write_bytes", no_write)
    monkeypatch.setattr(provenance, "append_provenance", no_write)
    (tmp_path / "labels.csv").write_bytes(LOG)
    path = tmp_path / name
    path.write_bytes(content)
    before = _snapshot(tmp_path)
    with pytest.raises(LabelImportError):
        ann = read_annotations(path, CLASSES)
        check_against_state(ann, experiment=EXP, pool_ids=POOL, pending=PENDING, labeled={})
    assert _snapshot(tmp_path) == before


def test_append_refuses_a_log_cut_inside_a_quoted_value(tmp_path):
    """The log read back fine ('Ann' at the end of the data), but the rows appended after it were
    swallowed into that open quote: the import reported new labels the log did not have."""
    log = tmp_path / "labels.csv"
    content = (",".join(PROVENANCE_COLUMNS) + '\ns1,0,cat,"Ann').encode()
    log.write_bytes(content)
    assert current_labels(log) == {"s1": 0}
    for dry_run in (True, False):
        with pytest.raises(LabelImportError, match="would not read back as its labels plus the new ones") as info:
            append_provenance(log, _plan(new=[("s2", 1, None)]), cycle_of={}, query_of={}, source="x",
                              imported_at="t", dry_run=dry_run)
        assert str(log) in str(info.value) and log.read_bytes() == content


def test_append_dry_run_checks_and_writes_nothing(tmp_path):
    log = tmp_path / "labels.csv"
    log.write_bytes(LOG)
    plan = _plan(new=[("s2", 0, None), ("s3", 1, None)])
    assert append_provenance(log, plan, cycle_of={}, query_of={}, source="x", imported_at="t", dry_run=True) == 2
    assert log.read_bytes() == LOG
    assert append_provenance(tmp_path / "new.csv", plan, cycle_of={}, query_of={}, source="x", imported_at="t",
                             dry_run=True) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]
    log.write_text("id,label\ns0,1\n")
    with pytest.raises(LabelImportError, match="another layout"):
        append_provenance(log, plan, cycle_of={}, query_of={}, source="x", imported_at="t", dry_run=True)


# --- spreadsheet formulas (issue #31, item 5) ------------------------------------------------

FORMULA_IDS = ["=1+17", "@SUM(1+1)", "-1", "+1", "'=x", "''=x", "'abc", "-2+3+cmd|' /C calc'!A0", "plain"]
FORMULA_CLASSES = ["=cmd|' /C calc'!A0", "-neg", "@home", "ok"]
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _cells(path):
    with open(path, newline="") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


def _formulas(cells):
    """Cells a spreadsheet would evaluate: a formula start, unless the cell is a plain number."""
    def number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False
    return [c for c in cells if c[:1] in TRIGGERS and not number(c)]


def test_query_csv_holds_no_formula_and_its_ids_and_labels_read_back_exactly(tmp_path):
    rows = [{"id": sid, "path": f"=IMAGE(\"{i}\")" if i == 0 else "", "score": -0.5 + i, "rank": i + 1,
             "suggested_label": i % 4} for i, sid in enumerate(FORMULA_IDS)]
    out = export_query_files(tmp_path / "q", EXP, 1, "q-1", rows, FORMULA_CLASSES)
    cells = _cells(out["csv"])
    assert not _formulas(cells), _formulas(cells)
    assert "'=1+17" in cells and "'@SUM(1+1)" in cells and "''=x" in cells and "-0.5" in cells
    # annotators copy the suggestion into `label`, as the spreadsheet shows it, and save
    with open(out["csv"], newline="") as fh:
        table = list(csv.reader(fh))
    header = table[0]
    for row in table[1:]:
        row[header.index("label")] = row[header.index("suggested_label")]
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(table)
    ann = read_annotations(filled, FORMULA_CLASSES)
    assert [(a.id, a.label) for a in ann.labels] == [(sid, i % 4) for i, sid in enumerate(FORMULA_IDS)]
    assert ann.experiment == EXP and ann.query_id == "q-1" and ann.cycle == 1


def test_provenance_log_holds_no_formula_and_reads_back_exactly(tmp_path):
    """The annotator is Label Studio's e-mail, as the annotator set it: the log opens in a spreadsheet."""
    who = "=HYPERLINK(\"http://evil\",\"x\")@example.org"
    plan = _plan(new=[(sid, n % 4, who if n % 2 else "@SUM(1+1)") for n, sid in enumerate(FORMULA_IDS)])
    plan.new["-1"].others = [Vote("-cmd@x.org", 1, 3)]
    log = tmp_path / "labels.csv"
    append_provenance(log, plan, cycle_of={}, query_of={}, source="=evil.csv", imported_at="t",
                      classes=FORMULA_CLASSES)
    cells = _cells(log)
    assert not _formulas(cells), _formulas(cells)
    assert current_labels(log) == {sid: n % 4 for n, sid in enumerate(FORMULA_IDS)}
    first = label_history(log, "=1+17")[0]
    assert (first["annotator"], first["label_name"], first["source"]) == ("@SUM(1+1)", "=cmd|' /C calc'!A0",
                                                                          "=evil.csv")
    assert label_history(log, "@SUM(1+1)")[0]["annotator"] == who
    assert label_history(log, "'=x")[0]["id"] == "'=x" and label_history(log, "'abc")[0]["id"] == "'abc"
    # appending keeps the bytes and still reads the earlier rows back
    before = log.read_bytes()
    append_provenance(log, _plan(new=[("=2", 3, "-a@b")]), cycle_of={}, query_of={}, source="x", imported_at="t")
    assert log.read_bytes().startswith(before)
    assert current_labels(log)["=2"] == 3 and label_history(log, "=2")[0]["annotator"] == "-a@b"


def test_a_log_written_before_the_formula_rule_still_reads_and_appends(tmp_path):
    log = tmp_path / "labels.csv"
    old = (",".join(PROVENANCE_COLUMNS) + "\n=1+17,0,cat,@alice,1,q-1,t,a.csv,,single,\n").encode()
    log.write_bytes(old)
    assert current_labels(log) == {"=1+17": 0}
    append_provenance(log, _plan(new=[("@x", 1, None)]), cycle_of={}, query_of={}, source="b", imported_at="t")
    assert log.read_bytes().startswith(old)
    assert current_labels(log) == {"=1+17": 0, "@x": 1}
    assert label_history(log, "=1+17")[0]["annotator"] == "@alice"
