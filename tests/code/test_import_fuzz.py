"""Property-based fuzz of the three label importers (csv, jsonl, Label Studio JSON).

The property: for any bytes an annotator or a tool may hand us, `read_annotations` followed by
`check_against_state` either returns or raises `LabelImportError` (the one error the CLI turns
into a message); nothing else escapes, and nothing on disk changes while reading or checking.
When a file is accepted, its plan is appended to a provenance log (one already there or none
yet) and must read back: `current_labels` gives exactly the merged labels.

The files are built from a model of what annotators return (valid rows, duplicates, partial
returns, several Label Studio annotations per task) and then broken in the ways files get
broken: other encodings (BOM, UTF-16/32, latin-1, invalid bytes), CRLF and CR line ends, other
separators and quoting, odd ids (unicode, empty, whitespace, very long, numbers), wrong JSON
types, missing columns or keys, unknown class names, and truncation at a random byte.

In the suite: the same (derandomized) 250 files per format and 250 provenance logs, about 20 s
on one core. For a long run:
    TIDAL_FUZZ_EXAMPLES=10000 pytest tests/code/test_import_fuzz.py -s
spreads that many generated files over the three formats (the provenance-log test stays at 300),
with a fresh random seed each run (TIDAL_FUZZ_SEED=N replays one), and prints how many were
accepted and refused, and the most frequent refusals. No example database is kept (.hypothesis/).
"""
from __future__ import annotations

import codecs
import collections
import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tidal.labeling import provenance, queries
from tidal.labeling.annotations import (CONFLICT_POLICIES, Annotation, ImportPlan, LabelImportError, Vote,
                                       check_against_state, read_annotations)
from tidal.labeling.provenance import PROVENANCE_COLUMNS, append_provenance, current_labels, label_history

CLASSES = ["cat", "dog", "bird"]
EXP, QID = "exp1", "q-2"
BASE_IDS = [f"s{i}" for i in range(10)]
FORMATS = ("csv", "jsonl", "label-studio")
SUFFIX = {"csv": ".csv", "jsonl": ".jsonl", "label-studio": ".json"}

_TOTAL = os.environ.get("TIDAL_FUZZ_EXAMPLES")
PER_FORMAT = -(-int(_TOTAL) // len(FORMATS)) if _TOTAL else 250
settings.register_profile(
    "tidal-fuzz", max_examples=PER_FORMAT, deadline=None, database=None, derandomize=_TOTAL is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
_SEED = int(os.environ["TIDAL_FUZZ_SEED"]) if os.environ.get("TIDAL_FUZZ_SEED") else None
FUZZ = settings.get_profile("tidal-fuzz")
OUTCOMES: collections.Counter = collections.Counter()
REFUSALS: collections.Counter = collections.Counter()  # (format, the message's start, paths and numbers elided)


def _seeded(test):
    return seed(_SEED)(test) if _SEED is not None else test


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if OUTCOMES:
        total = sum(v for k, v in OUTCOMES.items() if k[1] in ("accepted", "refused"))
        print(f"\nfuzzed {total} generated files: " + ", ".join(f"{fmt} {what}: {n}"
                                                           for (fmt, what), n in sorted(OUTCOMES.items())))
        if _TOTAL:
            print("most frequent refusals:")
            for (fmt, msg), n in REFUSALS.most_common(15):
                print(f"  {n:5}  {fmt:12}  {msg}")


# --- values ---------------------------------------------------------------------------------
# Each generator first draws `clean`: a file as a careful annotator or Label Studio would write
# it (odd but valid ids, CRLF/CR, BOM, quoting, duplicates, several annotations per task), or a
# broken one (any encoding, separator, JSON type, missing key, damaged bytes). Clean files are
# mostly accepted, so the accepting path (and the provenance log after it) is fuzzed as well.

class Raw(str):
    """JSON text written as is (huge numbers, deep nesting, escapes json.dumps never writes)."""


class Pairs(list):
    """A JSON object as ordered (key, value) pairs; keys may repeat."""


RAW_TOKENS = [
    Raw("1" * 5000), Raw("-" + "9" * 4400), Raw("1e999"), Raw("-0"), Raw("NaN"), Raw("-Infinity"),
    Raw('"\\ud800"'), Raw('"s1\\udfff"'), Raw('"\\u0000"'), Raw('"s\\u2028x"'), Raw('"\\ufeffs1"'),
    Raw("[" * 3000 + "]" * 3000), Raw('{"a":' * 2000 + "1" + "}" * 2000), Raw("[" * 50 + "]" * 50),
]
RAW = st.sampled_from(RAW_TOKENS)
_chars = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00")  # text: no lone
# surrogates, no NUL (the importer refuses a NUL byte: no text file has one; `_tricky` brings them)
_tricky_chars = ',;\t"\'\r\n \\|\x0b\x0c\x1c\x85\u2028\u2029\ufeff\u00a0\u3000'
_tricky_valid = st.text(alphabet=_tricky_chars, max_size=8)  # separators, quotes, line breaks of every kind
_tricky = st.text(alphabet=_tricky_chars + "\x00", max_size=8)


def _long(max_len: int):
    return st.tuples(st.text(_chars, min_size=1, max_size=3), st.integers(200, max_len)).map(
        lambda t: t[0] * (t[1] // len(t[0])))


def _heavy(common, *rare):
    """`common` about two times in three."""
    return st.one_of(*[common] * (2 * max(1, len(rare))), *rare)


VALID_IDS = _heavy(st.sampled_from(BASE_IDS),
                   st.sampled_from([" s1 ", "s2\r", "\u00a0s3", "0", "007", "-1", "1e3", "None", "null", "s1,s2",
                                    '"s3"', "s4;x", "a\tb", "ünï©ødé", "日本語", "\U0001F600", "e\u0301", "a\nb"]),
                   st.text(_chars, min_size=1, max_size=12).filter(str.strip), _long(100_000).filter(str.strip),
                   st.integers(-10**30, 10**30).map(str), _tricky_valid.map(lambda t: f"x{t}y"))
ANY_IDS = st.one_of(VALID_IDS, st.sampled_from(["", " ", "\t", "\ufeff"]), st.text(_chars, max_size=12), _tricky,
                    _long(140_000))
VALID_LABELS = _heavy(st.sampled_from(CLASSES), st.just(""), st.sampled_from([" dog ", "cat\t", "\u00a0bird"]))
ANY_LABELS = st.one_of(VALID_LABELS, st.sampled_from(["Cat", "DOG", "wolf", "0", "1", "-", "null", "cat,dog",
                                                      "\ufeffcat", "bird\n"]),
                       st.text(_chars, max_size=8), _tricky)
VALID_TEXT = _heavy(st.sampled_from(["alice", "bob", "carol@lab.org", "", " "]), st.text(_chars, max_size=10))
ANY_TEXT = st.one_of(VALID_TEXT, _tricky, _long(5000))
JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(_chars, max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _wrong(text_strategy):
    """A JSON value that is often the text, else the wrong type or raw JSON."""
    return st.one_of(text_strategy, text_strategy, text_strategy, st.none(), st.integers(-5, 10**6), st.floats(),
                     st.booleans(), JSON_ANY, RAW)


JSON = {
    True: {"id": st.one_of(VALID_IDS, VALID_IDS, VALID_IDS, st.integers(0, 10**6)),
           "label": st.one_of(VALID_LABELS, st.none()), "annotator": st.one_of(VALID_TEXT, st.none()),
           "experiment": st.sampled_from([EXP, EXP, "", None]), "cycle": st.sampled_from([2, 2, "2", " 2 ", None]),
           "query_id": st.sampled_from([QID, QID, "", None]), "path": VALID_TEXT, "score": st.floats(0, 1)},
    False: {"id": _wrong(ANY_IDS), "label": _wrong(ANY_LABELS), "annotator": _wrong(ANY_TEXT),
            "experiment": _wrong(st.sampled_from([EXP, "exp2", " exp1 "])),
            "cycle": _wrong(st.sampled_from(["2", "3", "two", "2.0", "1" * 5000, "\u0662", "1_0"])) | st.floats(),
            "query_id": _wrong(st.sampled_from([QID, "q-1"])), "path": _wrong(ANY_TEXT), "score": JSON_ANY},
}


def dumps(value, ensure_ascii: bool, sep: str = ", ") -> str:
    """json.dumps that also writes Raw tokens and repeated keys (Pairs); `sep` between items."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, (Pairs, dict)):
        items = value if isinstance(value, Pairs) else value.items()
        return "{" + sep.join(f"{json.dumps(k, ensure_ascii=ensure_ascii)}: {dumps(v, ensure_ascii, sep)}"
                              for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + sep.join(dumps(v, ensure_ascii, sep) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def _note_id(value, ids: set[str]) -> None:
    if isinstance(value, (str, int)) and not isinstance(value, (bool, Raw)):
        ids.add(str(value).strip())


# --- bytes ----------------------------------------------------------------------------------

ENCODINGS = ["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252",
             "double-bom"]


@st.composite
def encoded(draw, text: str, clean: bool) -> bytes:
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig"] if clean else ENCODINGS))
    if enc == "double-bom":
        return codecs.BOM_UTF8 * 2 + text.encode("utf-8")
    return text.encode(enc, "replace")


@st.composite
def broken(draw, data: bytes) -> bytes:
    """The file cut at a random byte, patched, padded, or left as is."""
    how = draw(st.sampled_from(["as-is", "truncate", "truncate", "insert", "replace", "append"]))
    if how == "as-is" or not data:
        return data
    pos = draw(st.integers(0, len(data)))
    if how == "truncate":
        return data[:pos]
    junk = draw(st.one_of(st.binary(min_size=1, max_size=6),
                          st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\r", b"\n", b'"', b",", b"\xef\xbb\xbf",
                                           b"\xed\xa0\x80", b"{", b"]"])))
    if how == "insert":
        return data[:pos] + junk + data[pos:]
    if how == "replace":
        return data[:pos] + junk + data[pos + len(junk):]
    return data + junk


def _finish(draw, text: str, clean: bool) -> bytes:
    data = draw(encoded(text, clean))
    return data if clean else draw(broken(data))


JUNK = st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode))


# --- csv ------------------------------------------------------------------------------------

CSV_COLUMNS = ["experiment", "cycle", "query_id", "id", "path", "score", "rank", "suggested_label", "label",
               "annotator"]


def _csv_value(draw, column: str, clean: bool) -> str:
    if column == "id":
        return draw(VALID_IDS if clean else ANY_IDS)
    if column == "label":
        return draw(VALID_LABELS if clean else ANY_LABELS)
    if column == "annotator":
        return draw(VALID_TEXT if clean else ANY_TEXT)
    choices = {"experiment": [EXP, EXP, ""], "cycle": ["2", "2", " 2 ", ""], "query_id": [QID, QID, ""]}.get(
        column, ["", "0.5", "3", "img/a.png", "x,y", "cat"])
    if not clean:
        choices = choices + {"experiment": ["exp2"], "cycle": ["3", "two", "1" * 5000, "\u0662", "1_0"],
                             "query_id": ["q-9"]}.get(column, [])
    return draw(st.sampled_from(choices))


@st.composite
def csv_files(draw):
    """(bytes, ids written, clean)."""
    clean, junk = _clean_or_junk(draw)
    if junk is not None:
        return junk, set(), False
    columns = draw(st.lists(st.sampled_from(CSV_COLUMNS), max_size=10, unique=clean))
    if clean or draw(st.integers(0, 3)):
        columns = [c for c in columns if c not in ("id", "label")]
        columns.insert(draw(st.integers(0, len(columns))), "id")
        columns.insert(draw(st.integers(0, len(columns))), "label")
    header = columns if clean else [draw(st.sampled_from([c] * 6 + [c.upper(), f" {c} ", f"\ufeff{c}", ""]))
                                    for c in columns]
    ids: set[str] = set()
    rows = []
    for _ in range(draw(st.integers(1 if clean else 0, 8))):
        row = [_csv_value(draw, c, clean) for c in columns]
        if "id" in columns:
            ids.add(row[columns.index("id")].strip())
        if not clean:
            ragged = draw(st.integers(0, 5))
            if ragged == 0 and row:
                row = row[:draw(st.integers(0, len(row) - 1))]
            elif ragged == 1:
                row += draw(st.lists(st.sampled_from(["", "x", "cat"]), min_size=1, max_size=2))
        rows.append(row)
    delimiter = "," if clean else draw(st.sampled_from([",", ";", "\t", "|"]))
    terminator = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]
                                   + ([] if clean else [csv.QUOTE_NONE])))
    buf = io.StringIO()
    try:
        writer = csv.writer(buf, delimiter=delimiter, lineterminator=terminator, quoting=quoting,
                            escapechar="\\" if quoting == csv.QUOTE_NONE else None)
        quoted = csv.writer(buf, delimiter=delimiter, lineterminator=terminator, quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        for row in rows:  # csv's minimal quoting leaves a \r or \n that is not in the line terminator bare
            (quoted if clean and any("\r" in v or "\n" in v for v in row) else writer).writerow(row)
    except csv.Error:  # QUOTE_NONE cannot write a lone empty field
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=delimiter, lineterminator=terminator)
        writer.writerow(header)
        writer.writerows(rows)
    text = terminator * draw(st.integers(0, 2)) + buf.getvalue()
    if draw(st.booleans()):
        text = text.rstrip("\r\n")  # no newline at the end
    return _finish(draw, text, clean), ids, clean


# --- jsonl ----------------------------------------------------------------------------------

@st.composite
def json_object(draw, keys: dict, required: tuple[str, ...], clean: bool):
    """A JSON object over `keys`: required ones (nearly always), some others; when broken, a repeated
    key or an unknown one now and then."""
    names = [k for k in keys if (k in required and (clean or draw(st.integers(0, 9)))) or draw(st.booleans())]
    pairs = Pairs((k, draw(keys[k])) for k in names)
    if not clean and pairs and draw(st.integers(0, 5)) == 0:  # a repeated key: json.loads keeps the last
        k = draw(st.sampled_from([k for k, _ in pairs]))
        pairs.append((k, draw(keys[k])))
    if draw(st.integers(0, 9)) == 0:
        pairs.append((draw(st.text(max_size=6)), draw(JSON_ANY)))
    return pairs


def _clean_or_junk(draw) -> tuple[bool, bytes | None]:
    """Whether a file is drawn clean, and for one in five unclean files the junk bytes it is."""
    clean = draw(st.booleans())
    return clean, draw(JUNK) if not clean and draw(st.integers(0, 4)) == 0 else None


@st.composite
def jsonl_files(draw):
    clean, junk = _clean_or_junk(draw)
    if junk is not None:
        return junk, set(), False
    ensure_ascii = draw(st.booleans())
    ids: set[str] = set()
    lines = []
    for _ in range(draw(st.integers(1 if clean else 0, 8))):
        kind = draw(st.sampled_from(["object"] * 8 + ["blank"] + ([] if clean else ["value", "garbage"])))
        if kind == "object":
            obj = draw(json_object(JSON[clean], ("id", "label"), clean))
            for k, v in obj:
                if k == "id":
                    _note_id(v, ids)
            lines.append(dumps(obj, ensure_ascii))
        elif kind == "value":
            lines.append(dumps(draw(st.one_of(JSON_ANY, RAW)), ensure_ascii))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
        else:
            lines.append(draw(st.text(max_size=20)))
    terminator = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = terminator.join(lines) + (terminator if draw(st.booleans()) else "")
    return _finish(draw, text, clean), ids, clean


# --- Label Studio ---------------------------------------------------------------------------

TIMES = ["2026-01-01T10:00:00.000000Z", "2026-01-02T00:00:00Z", "2026-01-02T00:00:00Z", "2025-12-31T23:59:59Z"]
LS = {}
for _clean in (True, False):
    _label = JSON[_clean]["label"]
    _choices = (st.lists(st.sampled_from(CLASSES), min_size=1, max_size=1) if _clean
                else st.one_of(st.lists(_label, max_size=2), _label, JSON_ANY))
    _item = st.fixed_dictionaries({"from_name": st.sampled_from(["label", "label", "other"]),
                                   "to_name": st.just("image"), "type": st.just("choices"),
                                   "value": st.fixed_dictionaries({"choices": _choices})})
    _result = (_heavy(st.lists(_item, min_size=1, max_size=2), st.just([])) if _clean
               else st.one_of(st.lists(st.one_of(_item, JSON_ANY), max_size=2), JSON_ANY))
    _users = _heavy(st.integers(1, 4), st.fixed_dictionaries({"id": st.integers(1, 4),
                                                               "email": st.sampled_from(["a@x.org", "b@x.org"])}),
                    st.sampled_from(["carol", None]))
    _times = st.sampled_from(TIMES) if _clean else st.one_of(st.sampled_from(TIMES + [""]), JSON_ANY)
    LS[_clean] = {
        "annotation": {"id": st.integers(1, 10**6), "completed_by": _users if _clean else st.one_of(_users, JSON_ANY),
                       "was_cancelled": st.booleans() if _clean else st.one_of(st.booleans(), JSON_ANY),
                       "created_at": _times, "updated_at": _times, "result": _result, "lead_time": st.floats(0, 9)},
        "data": {"image": JSON[_clean]["path"], "sample_id": JSON[_clean]["id"],
                 "experiment": JSON[_clean]["experiment"], "cycle": JSON[_clean]["cycle"],
                 "query_id": JSON[_clean]["query_id"], "rank": st.integers(1, 9)},
        "result": _result,
    }


@st.composite
def ls_task(draw, ids: set[str], clean: bool):
    if not clean and draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(JSON_ANY, RAW))
    keys = LS[clean]
    data = draw(json_object(keys["data"], ("sample_id",), clean)) if clean or draw(st.integers(0, 5)) else \
        draw(JSON_ANY)
    if isinstance(data, Pairs):
        for k, v in data:
            if k == "sample_id":
                _note_id(v, ids)
    annotation = json_object(keys["annotation"], ("result", "completed_by", "was_cancelled", "updated_at"), clean)
    task = Pairs([("id", draw(st.integers(1, 10**6))), ("data", data)])
    how = draw(st.sampled_from(["list", "list", "list", "list", "missing"] + ([] if clean else ["other"])))
    if how == "list":
        task.append(("annotations", draw(st.lists(annotation if clean else st.one_of(annotation, JSON_ANY),
                                                  max_size=4))))
    elif how == "other":
        task.append(("annotations", draw(JSON_ANY)))
    if draw(st.booleans()):
        task.append(("predictions", [{"model_version": "exp1-cycle2", "result": draw(keys["result"])}]))
    return task


@st.composite
def labelstudio_files(draw):
    clean, junk = _clean_or_junk(draw)
    if junk is not None:
        return junk, set(), False
    ids: set[str] = set()
    shape = draw(st.sampled_from(["list"] * 8 + ["single"] + ([] if clean else ["other"])))
    if shape == "list":
        doc = draw(st.lists(ls_task(ids, clean), min_size=1 if clean else 0, max_size=6))
    elif shape == "single":
        doc = draw(ls_task(ids, clean))
    else:
        doc = draw(st.one_of(JSON_ANY, RAW))
    text = dumps(doc, draw(st.booleans()), sep=draw(st.sampled_from([", ", ",", ",\n  ", ",\r\n", ",\r"])))
    return _finish(draw, text, clean), ids, clean


# --- the property ---------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


_LOGS = {  # labels.csv before the import
    "none": None,
    "new": (",".join(PROVENANCE_COLUMNS) + "\ns3,0,cat,alice,1,q-1,t0,a.csv,,single,\n").encode(),
    "crlf": (",".join(PROVENANCE_COLUMNS) + "\r\ns3,0,cat,alice,1,q-1,t0,a.csv,,single,\r\n"
             "s4,2,bird,,1,q-1,t0,a.csv,,single,").encode(),  # CRLF line ends, no last one
}


@st.composite
def experiment_states(draw, ids: set[str]):
    pool = set(BASE_IDS) | {i for i in ids if i} | set(draw(st.lists(VALID_IDS, max_size=2)))
    ordered = sorted(pool)
    waiting = ordered if draw(st.booleans()) else draw(st.lists(st.sampled_from(ordered), max_size=10))
    pending = {i: {"cycle": 2, "query_id": QID} for i in waiting}
    labeled = {i: draw(st.integers(0, 2)) for i in draw(st.lists(st.sampled_from(ordered), max_size=4))
               if i not in pending}
    return dict(pool_ids=pool, pending=pending, labeled=labeled, force=draw(st.booleans()),
                relabel=draw(st.booleans()), conflicts=draw(st.sampled_from(CONFLICT_POLICIES)),
                log=draw(st.sampled_from(sorted(_LOGS))), infer=draw(st.booleans()))


def _forbid_writes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"reading or checking annotations wrote a file: {args[:1]}")

    monkeypatch.setattr(queries, "atomic_write_bytes", refuse)
    monkeypatch.setattr(queries, "atomic_write_text", refuse)
    monkeypatch.setattr(provenance, "atomic_write_bytes", refuse)


def check_import(fmt: str, data: bytes, state: dict, base: Path, clean: bool = False) -> str:
    """Run one generated file through read, check and (if accepted) the provenance log.

    A clean file (well-formed, only odd in valid ways) checked with --force --relabel must be
    accepted, unless it has no rows at all."""
    root = Path(tempfile.mkdtemp(dir=base))
    try:
        path = root / f"answers{SUFFIX[fmt]}"
        path.write_bytes(data)
        log = root / "labels.csv"
        if _LOGS[state["log"]] is not None:
            log.write_bytes(_LOGS[state["log"]])
        before = _snapshot(root)
        logged = current_labels(log)
        with pytest.MonkeyPatch.context() as mp:
            _forbid_writes(mp)
            try:
                ann = read_annotations(path, CLASSES, None if state["infer"] else fmt, conflicts=state["conflicts"])
                plan = check_against_state(ann, experiment=EXP, pool_ids=state["pool_ids"],
                                           pending=state["pending"], labeled={**state["labeled"], **logged},
                                           force=state["force"], relabel=state["relabel"])
            except LabelImportError as err:
                REFUSALS[(fmt, re.sub(r"\d+", "N", str(err).replace(str(root), ""))[:70])] += 1
                assert str(err).strip(), "a refusal must say why"
                assert not (clean and state["force"] and state["relabel"]) or "no annotations in" in str(err), \
                    f"a valid file was refused: {err}"
                assert _snapshot(root) == before, "a refused file changed what is on disk"
                return "refused"
        assert _snapshot(root) == before, "reading and checking must not write"
        _check_annotations(ann)
        if ann.conflicts:
            OUTCOMES[(fmt, "accepted with conflicts")] += 1
        changed = plan.updates()
        if changed:
            added = append_provenance(log, plan, cycle_of={i: 2 for i in changed},
                                      query_of={i: QID for i in changed}, source=str(path),
                                      imported_at="2026-01-01T00:00:00Z", classes=CLASSES)
            assert added == len(changed)
        assert current_labels(log) == {**logged, **changed}
        for i in list(changed)[:3]:
            assert label_history(log, i)[-1]["label"] == str(changed[i])
        return "accepted"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _check_annotations(ann) -> None:
    ids = [a.id for a in ann.labels]
    assert len(ids) == len(set(ids)), "an id is imported twice"
    assert all(isinstance(i, str) and i == i.strip() and i for i in ids)
    assert all(0 <= a.label < len(CLASSES) and a.row >= 1 for a in ann.labels)
    refused = {c.id for c in ann.conflicts if c.label is None}
    assert not refused & set(ids) and not set(ann.skipped) & set(ids) and not refused & set(ann.skipped)
    assert len(ann.skipped) == len(set(ann.skipped))
    for c in ann.conflicts:
        assert len({v.label for v in c.votes}) > 1


def _fuzz(fmt: str, files):
    @FUZZ
    @_seeded
    @given(case=files.flatmap(lambda f: st.tuples(st.just(f[0]), experiment_states(f[1]), st.just(f[2]))))
    def run(case, tmp_path_factory):
        data, state, clean = case
        OUTCOMES[(fmt, check_import(fmt, data, state, tmp_path_factory.getbasetemp(), clean))] += 1

    return run


test_fuzz_csv = _fuzz("csv", csv_files())
test_fuzz_jsonl = _fuzz("jsonl", jsonl_files())
test_fuzz_labelstudio = _fuzz("label-studio", labelstudio_files())


# --- the provenance log itself --------------------------------------------------------------

@st.composite
def log_files(draw):
    """What may already be in labels.csv: our layout (any line ends, BOM), hand-edited, damaged, junk."""
    columns = draw(st.sampled_from([PROVENANCE_COLUMNS, PROVENANCE_COLUMNS[:3],
                                    ["id", "label"], ["label", "id"], []]))
    cells = {"id": _heavy(st.sampled_from(["s1", "s2", "s3"]), VALID_IDS),
             "label": _heavy(st.sampled_from(["0", "1", "2"]), st.sampled_from(["", "x", " 1", "1" * 5000]))}
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = [draw(cells.get(c, st.sampled_from(["", "1", "q-1", "dog", "a,b", "[]"]))) for c in columns]
        if draw(st.integers(0, 4)) == 0:
            row = row[:draw(st.integers(0, len(row)))] + draw(st.lists(st.just("x"), max_size=2))
        rows.append(row)
    terminator = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=terminator, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL,
                                                                                     csv.QUOTE_ALL])))
    writer.writerow(columns)
    for row in rows:
        (writer if draw(st.booleans()) else csv.writer(buf, lineterminator=terminator, quoting=csv.QUOTE_ALL)
         ).writerow(row)
    text = buf.getvalue()
    if draw(st.booleans()):
        text = text.rstrip("\r\n")
    return _finish(draw, text, clean=draw(st.booleans()))


_VOTES = st.lists(st.builds(Vote, st.one_of(st.none(), VALID_TEXT.map(str.strip)), st.integers(0, 2),
                            st.integers(1, 9)), max_size=2)


@settings(FUZZ, max_examples=min(PER_FORMAT, 300))
@_seeded
@given(old=st.one_of(log_files(), log_files(), st.binary(max_size=200)),
       new=st.lists(st.tuples(VALID_IDS, st.integers(0, 2), st.one_of(st.none(), VALID_TEXT.map(str.strip)), _VOTES),
                    min_size=1, max_size=3, unique_by=lambda t: t[0].strip()))
def test_fuzz_provenance_log(old, new, tmp_path_factory):
    """Whatever labels.csv holds, reading and appending either work or raise LabelImportError; a
    refused append leaves the file byte-identical, an accepted one keeps every old row's bytes."""
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        log = root / "labels.csv"
        log.write_bytes(old)
        plan = ImportPlan(new={i.strip(): Annotation(i.strip(), lab, who or None, n, "newest" if votes else "single",
                                                     votes)
                               for n, (i, lab, who, votes) in enumerate(new, 2)})
        try:
            before = current_labels(log)
        except LabelImportError:
            before = None
        assert log.read_bytes() == old
        try:
            append_provenance(log, plan, cycle_of={}, query_of={}, source="f.csv", imported_at="t", classes=CLASSES)
        except LabelImportError:
            assert log.read_bytes() == old, "a refused append changed labels.csv"
            OUTCOMES[("provenance-log", "append refused")] += 1
            return
        OUTCOMES[("provenance-log", "appended")] += 1
        assert before is not None, "appended to a log that cannot be read"
        assert current_labels(log) == {**before, **plan.updates()}
        if old.strip():  # the old rows' bytes follow the header line
            old_rows, new_rows = (_LINE_END.split(data, maxsplit=1)[1:] for data in (old, log.read_bytes()))
            assert new_rows and new_rows[0].startswith(old_rows[0] if old_rows else b""), "an old row was rewritten"
    finally:
        shutil.rmtree(root, ignore_errors=True)
