"""The experiment workspace `runs/<experiment>/`: state.json, cycles/<k>/, learning_curve.csv.

Every file is written atomically (temp file, fsync, rename), so a crash leaves either the old
or the new version, never a torn one; a rerun resumes from what is on disk.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

LEARNING_CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labeled", "accuracy"]


class WorkspaceWriteError(RuntimeError):
    """A file of the workspace could not be written (disk full, read-only); nothing is torn."""


# Errors of the file system rather than of the program: said plainly, with what to do.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "the operation is not permitted"}


def write_error(path: Path, err: OSError) -> WorkspaceWriteError | OSError:
    """A WorkspaceWriteError for the errors a user fixes outside the program, else err itself."""
    if err.errno not in _WRITE_ERRNOS:
        return err
    return WorkspaceWriteError(
        f"cannot write {path}: {_WRITE_ERRNOS[err.errno]}. Nothing was half-written: every file keeps its last "
        f"complete version. Free space or make the folder writable (or point runs_dir elsewhere with "
        f"--set runs_dir=DIR), then run the same command again: it resumes.")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it; elsewhere set to a
    strict 0o077 and back under a lock (os.umask has no read-only form, and a file another thread
    creates in between is then only stricter)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes], mode: int | None = None) -> None:
    """Write `path` whole or not at all: `data`, or its blocks one after another (a big file
    need not be held whole). `mode`: its permission bits, by default what open() gives (0o666
    less the umask); a secret passes 0o600, which it has from its first byte on."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp makes the file 0600; by default it gets the mode open() gives, so annotators
            # and a Label Studio under other accounts read what the umask lets them.
            os.fchmod(fh.fileno(), 0o666 & ~current_umask() if mode is None else mode)
            fh.write(data) if isinstance(data, bytes) else fh.writelines(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection; OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A plain decimal number starts with '-' or '+' and runs as nothing but itself: it stays a number,
# so scores, seeds and accuracies read as numbers in DVC plots, pandas and a spreadsheet's sort.
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def neutralize_cell(value: Any) -> str:
    """The text of a CSV cell that no spreadsheet runs: "'" before a cell that starts a formula
    (FORMULA_STARTS, unless a plain number), and before a cell that starts with "'" followed by
    one of those or by "'" (so that `restore_cell` tells the two apart). `restore_cell` undoes it.
    """
    text = "" if value is None else str(value)
    if text[:1] in FORMULA_STARTS and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    if text[:1] == "'" and text[1:2] in (*FORMULA_STARTS, "'"):
        return "'" + text
    return text


def restore_cell(text: str) -> str:
    """The value `neutralize_cell` wrote: a cell of "'" followed by a formula start or "'" loses
    its first "'" (also the spreadsheet way to type such text). Other cells, those of files
    written before the rule included, are read as they are."""
    if text[:1] == "'" and text[1:2] in (*FORMULA_STARTS, "'"):
        return text[1:]
    return text


def csv_rows(columns: list[str], rows: list[dict]) -> str:
    """CSV lines with "\\n" line ends, no header, each cell neutralized (`neutralize_cell`): people
    open these files in spreadsheets. They read back as written: csv's minimal quoting does not
    quote a lone "\\r" (it is not in the line terminator), which a reader takes for a line end, so a
    row holding one is written fully quoted."""
    buf = io.StringIO()
    plain = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    quoted = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        cells = {key: neutralize_cell(value) for key, value in row.items()}
        (quoted if any("\r" in cell for cell in cells.values()) else plain).writerow(cells)
    return buf.getvalue()


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> None:
    """A CSV file with a header line (`csv_rows`), written atomically; `read_csv` reads it back."""
    atomic_write_text(path, csv_rows(columns, [{c: c for c in columns}]) + csv_rows(columns, rows))


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows `write_csv` wrote, each cell as it was given (`restore_cell`)."""
    with open(path, newline="") as fh:
        return [{key: restore_cell(value) if isinstance(value, str) else value for key, value in row.items()}
                for row in csv.DictReader(fh)]


class Workspace:
    def __init__(self, runs_dir: str | Path, experiment: str) -> None:
        self.root = Path(runs_dir) / experiment
        self.experiment = experiment

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def learning_curve_path(self) -> Path:
        return self.root / "learning_curve.csv"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def skipped_images_path(self) -> Path:
        """The image files left out of the pool (bad_images: skip), with the reason for each."""
        return self.root / "skipped_images.csv"

    def cycle_dir(self, cycle: int) -> Path:
        return self.root / "cycles" / str(cycle)

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load_state(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(f"no experiment state at {self.state_path}; start one with `tidal run`")
        return read_json(self.state_path)

    def save_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_path, state)


def workspace(params: dict[str, Any]) -> Workspace:
    """The workspace of the experiment `params` name: `<runs_dir>/<experiment>/`."""
    return Workspace(params["runs_dir"], params["experiment"])


class ExperimentLocked(RuntimeError):
    """Another live process is running this experiment."""


class ExperimentLock:
    """`runs/<experiment>/.lock` holding the owner's pid and host, taken with O_EXCL.

    A lock whose process is gone (same host, pid not alive) is stale: it is reported and taken
    over. A lock from another host is never broken automatically. `wait_s`: how long to wait
    for a live owner to finish before ExperimentLocked (0: not at all).
    """

    POLL_S = 2.0
    # The locks this process holds: (pid, lock path) -> (the holding thread, token). The thread
    # that holds a lock may enter it again (`tidal run` holds it from its checks through the flow
    # it calls, whose own `with` enters again); any other thread waits for it like another
    # process. `token` is new each time the lock is taken afresh, so a result kept "while the lock
    # is held" can tell whether it was let go in between (`holding`).
    _held: dict[tuple[int, Path], tuple[int, object]] = {}

    def __init__(self, root: str | Path, wait_s: float = 0.0) -> None:
        self.path = Path(root) / ".lock"
        self.wait_s = wait_s
        self.stale_owner: dict | None = None
        self.created_root = False
        self.reentered = False

    @classmethod
    def holding(cls, root: str | Path) -> object | None:
        """The token of this process's hold of root's lock (taken by any of its threads: a flow's
        tasks run in worker threads), or None when it does not hold it."""
        held = cls._held.get((os.getpid(), (Path(root) / ".lock").absolute()))
        return held[1] if held else None

    def __enter__(self) -> "ExperimentLock":
        import time

        key = (os.getpid(), self.path.absolute())
        held = ExperimentLock._held.get(key)
        if held is not None and held[0] == threading.get_ident():
            self.reentered = True
            return self
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self._take()
                ExperimentLock._held[key] = (threading.get_ident(), object())
                return self
            except ExperimentLocked:
                if time.monotonic() + self.POLL_S > deadline:
                    raise
                time.sleep(self.POLL_S)

    def _take(self) -> "ExperimentLock":
        import socket
        import time

        self.created_root = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from err
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
                    self.stale_owner = owner
                    self.path.unlink(missing_ok=True)
                    continue
                raise ExperimentLocked(
                    f"experiment in {self.path.parent} is being run by pid {owner.get('pid')} on "
                    f"{owner.get('host')} since {owner.get('since')}; wait for it to finish. If that "
                    f"process is gone, delete {self.path}.") from None
            except OSError as err:
                raise write_error(self.path, err) from err
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as err:
                self.path.unlink(missing_ok=True)
                raise write_error(self.path, err) from err
            return self
        raise ExperimentLocked(f"could not take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.reentered:
            return
        del ExperimentLock._held[(os.getpid(), self.path.absolute())]
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_root:
            # A start that failed before writing anything leaves no empty runs/<experiment>/.
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # not empty: the experiment started

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: it only waits to be reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
