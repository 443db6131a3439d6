"""tidal.labels: query export, annotation import (csv/jsonl/Label Studio), checks, provenance log."""
from __future__ import annotations

import csv
import json

import pytest

from tidal.labels import (PROVENANCE_COLUMNS, Annotation, Annotations, ImportPlan, LabelImportError,
                          append_provenance, check_against_state, current_labels, export_query_files,
                          label_history, read_annotations)

CLASSES = ["cat", "dog", "bird"]
EXP = "exp1"


def _rows(n=4):
    return [{"id": f"s{i}", "path": f"img/s{i}.png" if i % 2 else "", "score": 0.5 + i / 10, "rank": i + 1,
             "suggested_label": i % 3} for i in range(n)]


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
                                "query_id": "q-2", "rank": 2}
    pred = tasks[1]["predictions"][0]
    assert pred["model_version"] == "exp1-cycle2" and pred["score"] == 0.6
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


def test_labelstudio_latest_non_cancelled_annotation_wins(exported, tmp_path):
    tasks = _ls_export(exported)
    tasks[0]["annotations"] = [_ls_annotation("cat", when="2026-01-02T00:00:00Z"),
                               _ls_annotation("bird", when="2026-01-01T00:00:00Z"),
                               _ls_annotation("dog", cancelled=True, when="2026-01-03T00:00:00Z")]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    ann = read_annotations(path, CLASSES)
    assert [(a.id, a.label) for a in ann.labels] == [("s0", 0)]


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
def test_duplicate_id_names_both_rows(tmp_path, fmt):
    if fmt == "csv":
        path = _write_csv(tmp_path / "a.csv", ["id", "label"], [["s0", "cat"], ["s1", "dog"], ["s0", "bird"]])
        first, second = "line 2", "line 4"
    elif fmt == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text('{"id": "s0", "label": "cat"}\n{"id": "s1", "label": null}\n{"id": "s0", "label": null}\n')
        first, second = "line 1", "line 3"
    else:
        path = tmp_path / "a.json"
        path.write_text(json.dumps([{"data": {"sample_id": "s0"}}, {"data": {"sample_id": "s0"}}]))
        first, second = "task #1", "task #2"
    msg = _raises(path, "appears twice")
    assert f"{path} {second}" in msg and f"also at {path} {first}" in msg and "'s0'" in msg


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
