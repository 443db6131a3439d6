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
