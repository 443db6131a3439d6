"""The data version check: DVC's directory md5, with a stat-keyed memo of file md5s."""
from __future__ import annotations

import os
import time

import pytest

import tidal.data.version as version
from tidal.data import materialize
from tidal.data.version import dvc_dir_md5


@pytest.fixture
def counted_md5(monkeypatch, tmp_path):
    """Count the files whose bytes are read; the memo lives in this test's cache dir."""
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = version._file_md5

    def md5(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(version, "_file_md5", md5)
    return calls


def _age(root, seconds: float = 60.0) -> None:
    """Date every file back, as files written before this check would be."""
    past = time.time() - seconds
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), (past, past))


def test_memo_reads_only_files_whose_size_or_mtime_changed(tmp_path, counted_md5):
    root = materialize(tmp_path / "data", "digits")
    _age(root)
    n_files = sum(len(names) for _, _, names in os.walk(root))
    first = dvc_dir_md5(root)
    assert len(counted_md5) == n_files
    counted_md5.clear()
    assert dvc_dir_md5(root) == first and counted_md5 == []  # every md5 from the memo
    labels = root / "labels.npy"
    raw = bytearray(labels.read_bytes())
    raw[-1] ^= 1  # same size: only the mtime tells
    labels.write_bytes(bytes(raw))
    changed = dvc_dir_md5(root)
    assert counted_md5 == ["labels.npy"] and changed != first
    os.environ.pop("TIDAL_CACHE_DIR")  # the memo's answer equals a fresh read of every file
    assert dvc_dir_md5(root) == changed


def test_a_file_written_just_now_is_read_again_next_time(tmp_path, counted_md5):
    """Racy git: a write in the same timestamp tick as the check must not hide behind the memo."""
    root = materialize(tmp_path / "data", "digits")
    _age(root)
    dvc_dir_md5(root)
    labels = root / "labels.npy"
    labels.write_bytes(labels.read_bytes())  # mtime: now
    counted_md5.clear()
    dvc_dir_md5(root)
    dvc_dir_md5(root)
    assert counted_md5 == ["labels.npy", "labels.npy"]


def test_a_torn_memo_is_ignored(tmp_path, counted_md5):
    root = materialize(tmp_path / "data", "digits")
    _age(root)
    expected = dvc_dir_md5(root)
    version._md5_memo_path(str(root)).write_text("{not json")
    counted_md5.clear()
    assert dvc_dir_md5(root) == expected and counted_md5  # read again, memo rewritten
    counted_md5.clear()
    assert dvc_dir_md5(root) == expected and counted_md5 == []


def test_an_experiments_data_version_covers_the_pool_and_only_its_own_labels(tmp_path):
    from tidal.data.version import LABELS_DIR, experiment_data_version, pool_version

    root = tmp_path / "data"
    (root / "pool").mkdir(parents=True)
    (root / "pool" / "x.npy").write_bytes(b"pool bytes")
    pool = pool_version(root)
    assert experiment_data_version(root, "a") == experiment_data_version(root, "b") == pool  # no labels yet
    (root / LABELS_DIR).mkdir()
    (root / LABELS_DIR / "a.csv").write_text("id,label\ns1,3\n")
    a1, b1 = experiment_data_version(root, "a"), experiment_data_version(root, "b")
    assert a1 != pool and b1 == pool  # a's import changes a's version only
    (root / LABELS_DIR / "b.csv").write_text("id,label\ns2,1\n")
    assert experiment_data_version(root, "a") == a1  # and b's leaves a's alone
    (root / LABELS_DIR / "a.csv").write_text("id,label\ns1,4\n")
    assert experiment_data_version(root, "a") != a1
    (root / "pool" / "x.npy").write_bytes(b"other pool")
    assert experiment_data_version(root, "b") != experiment_data_version(root, "b", pool=pool)


def test_pin_lock_serializes_two_repins(tmp_path):
    import threading
    import time

    from tidal.data.version import pin_lock

    (tmp_path / "data.dvc").write_text("outs: []\n")
    inside, overlaps = [], []

    def repin(name: str) -> None:
        with pin_lock(tmp_path / "data"):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.3)
            inside.remove(name)

    threads = [threading.Thread(target=repin, args=(n,)) for n in ("a", "b")]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and time.perf_counter() - start >= 0.6


def test_listing_and_memo_are_hashed_and_written_in_blocks_as_one_json_text_would_be():
    """Over 10,000 entries (so across block boundaries), with names JSON escapes: DVC's listing
    hash and the memo's bytes equal those of one json.dumps of everything."""
    import hashlib
    import json

    from tidal.data.version import _json_blocks, _tree_md5

    entries = sorted((f"train/c{i % 3}/é \"{i}\".jpg", f"{i:032x}") for i in range(25_001))
    entries.append(("labels/exp.csv", "f" * 32))
    listing = [{"md5": m, "relpath": r} for r, m in entries]
    assert _tree_md5(entries) == hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    kept = [e for e in listing if not e["relpath"].startswith("labels/")]
    assert _tree_md5(entries, exclude=("labels",)) == hashlib.md5(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    assert _tree_md5([]) == hashlib.md5(b"[]").hexdigest()
    memo = {r: [i, i * 7, i + 1, m] for i, (r, m) in enumerate(entries)}
    assert b"".join(_json_blocks(memo.items(), lambda block: json.dumps(dict(block)), "{}")) == json.dumps(memo).encode()
