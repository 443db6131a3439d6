"""Crash safety at random kill points: SIGKILL one command of a human-mode experiment at a random
moment, finish the experiment, and check it ends exactly where an uninterrupted run ends.

The failpoints of tidal/faults.py kill at named places; this kills anywhere. In a scratch copy of
the project (a git repository with the project's files and DVC's .dvc/, as tests/integration/
test_dvc.py builds one), with MLflow tracking on (`sqlite:///<work>/mlflow.db`) and each `tidal run`
starting Prefect's own temporary server (PREFECT_HOME in the work folder):

* reference: one uninterrupted 3-cycle human-mode debug experiment, `ref`: `tidal run`, then per
  query `tidal import-labels` (the data set's true labels) and `tidal run` again, until the cycles
  are done and the last run has closed the MLflow parent run. Each command is timed.
* kill point k (seeded): experiment `kp-<k>` runs the same commands, but one of them, drawn at
  random, is started in a session of its own and SIGKILLed (its whole process group: the CLI, its
  Prefect server, a `dvc add` under way) after a delay drawn uniformly over that command's time in
  the reference; then the sequence goes on from that command (rerun) to the end.
* checks, against the reference: learning_curve.csv (every column), each cycle's query ids, the
  labels log data/labels/<exp>.csv (ids, labels, cycles), state.json (labels, pending ids, history,
  imports), data.dvc against the directory and `dvc status data.dvc`, MLflow (one parent run and
  one child run per cycle, all FINISHED, no metric with one step twice in any run, the non-system
  metrics and the data-version tags as in the reference), no `.lock` or `import.json` left, and
  no process of the point left (its command lines name the point's folder; every process it
  started carries a marker in its environment, found in /proc).

With `--scope command` a point does not replay the experiment: the reference saves its state
(project copy, MLflow store and artifacts, cache) before every command and what the checks read
after it; point k restores the state before its drawn command, kills that command, reruns it, and
compares the state right after it with the reference's at the same place (the end-state checks
that only hold at the end, one FINISHED child per cycle, become "the runs and their statuses are
the reference's"). A point then costs one and a half commands instead of the whole sequence: the
suite's CI-sized subset (tests/integration/test_kill_points.py) runs this way.

One JSON file per point under OUT/points/<k>.json (skipped when present, so an interrupted run
resumes); OUT/README.md is rebuilt from whatever points exist.

    python tests/integration/kill_points.py --points 10 --seed 0
    python tests/integration/kill_points.py --points 10 --seed 0 --cycles 1 --scope command
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kill_points"
WORK_MARKER = ".kill-points-work"
REFERENCE = "ref"
SCOPES = ("sequence", "command")
SAVED_PARTS = ("repo", "mlartifacts", "cache")  # with mlflow.db: what a saved state holds
MARKER_ENV = "TIDAL_KILL_POINT"  # every process of a sequence inherits it: how leftovers are found
CHECKS = ["sequence", "curve", "queries", "labels_log", "state", "dvc_pin", "dvc_status", "mlflow_runs",
          "mlflow_steps", "mlflow_metrics", "mlflow_tags", "lock_journal", "processes"]
CHECK_TEXT = {
    "sequence": "every command of the sequence (the killed one rerun) exited 0",
    "curve": "learning_curve.csv, every column, equals the reference's",
    "queries": "each cycle's query.csv lists the reference's ids in its order",
    "labels_log": "data/labels/<exp>.csv: the reference's (id, label, cycle) rows in its order",
    "state": "state.json: cycle, labels, pending ids, history and the imports that changed labels as in the "
             "reference",
    "dvc_pin": "data.dvc pins the md5 of data/ as it is (tidal.data.version.dvc_dir_md5)",
    "dvc_status": "`dvc status data.dvc` is clean (command scope, before the end: it says what the "
                  "reference's says there)",
    "mlflow_runs": "one parent run, one child run per cycle, all FINISHED, the ids state.json records "
                   "(command scope, before the end: the reference's runs and statuses there)",
    "mlflow_steps": "no metric of any run has one step twice (MlflowClient.get_metric_history)",
    "mlflow_metrics": "every metric but system/* has the reference's (step, value) history",
    "mlflow_tags": "the parent's data_version tags: one per import, the last one state.json's",
    "lock_journal": "no runs/<exp>/.lock and no runs/<exp>/import.json left",
    "processes": "no process of the point left once the sequence ended (/proc)",
}


# --- arguments and the scratch project --------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=10, help="kill points 0..N-1 (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points' draws (default 0)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default benchmarks/results/kill_points)")
    p.add_argument("--work", default=None,
                   help="scratch folder: project copy, MLflow db, Prefect home (default: a new temporary "
                        "folder, removed at the end); a kept one is reused, with its reference")
    p.add_argument("--cycles", type=int, default=3, help="cycles of the experiment (default 3)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one command may take (default 900)")
    p.add_argument("--scope", choices=SCOPES, default="sequence",
                   help="sequence (default): a point replays the whole experiment under its own name and checks "
                        "its end; command: a point starts from the reference's state before its command and "
                        "checks the state right after that command's rerun")
    return p.parse_args(argv)


def _atomic_write(path: Path, text: str) -> None:
    from tidal.workspace import atomic_write_text  # the library's one atomic write (temp, fsync, rename)

    atomic_write_text(path, text)


def _project_files() -> list[str]:
    """Tracked and untracked-not-ignored files of the project, without tests and results."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return [f for f in out if not f.startswith(("tests/", "benchmarks/results/")) and (REPO / f).is_file()]


class Work:
    """The scratch folder: repo/ (project copy), mlflow.db, prefect-home/, cache/, points/."""

    def __init__(self, root: Path, cycles: int, timeout: float) -> None:
        self.root = root
        self.repo = root / "repo"
        self.db = root / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        self.cycles = cycles
        self.timeout = timeout

    def env(self, tag: str) -> dict[str, str]:
        env = {**os.environ,
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CI": "1", "DO_NOT_TRACK": "1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": self.uri,
               "PREFECT_HOME": str(self.root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "TIDAL_CACHE_DIR": str(self.root / "cache"), "PYTHONUNBUFFERED": "1", MARKER_ENV: tag}
        env.setdefault("OMP_NUM_THREADS", "1")
        for key in ("PREFECT_API_URL", "TIDAL_FAILPOINT", "TIDAL_FAILPOINT_ACTION"):
            env.pop(key, None)  # its own temporary server; no named failpoint
        return env

    def tag(self, exp: str) -> str:
        return f"{self.root}:{exp}"

    def point_dir(self, exp: str) -> Path:
        return self.root / "points" / exp

    def build(self) -> None:
        """The project copy as a git repository with DVC set up, its data written and checked."""
        if self.repo.exists():
            shutil.rmtree(self.repo)
        for rel in _project_files():
            (self.repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, self.repo / rel)
        env = self.env(self.tag("setup"))
        git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        if not (self.repo / ".dvc" / "config").is_file():
            subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=self.repo, check=True, env=env)
        subprocess.run(["git", "add", "-A"], cwd=self.repo, check=True)
        subprocess.run([*git, "commit", "-qm", "copy"], cwd=self.repo, check=True)
        data = subprocess.run([str(BIN / "tidal"), "data"], cwd=self.repo, env=env, capture_output=True, text=True)
        if data.returncode != 0 or "matches its DVC pin" not in data.stdout:
            raise RuntimeError(f"`tidal data` in {self.repo}: {data.stdout}{data.stderr}")
        from mlflow import MlflowClient

        if self.db.exists():
            self.db.unlink()
        MlflowClient(tracking_uri=self.uri).search_experiments()  # creates and migrates the store

    @staticmethod
    def _copy_db(source: Path, dest: Path) -> None:
        """sqlite's backup API: dest keeps its file, so a connection MLflow keeps open in this process
        (its store is cached per URI) reads the copied content, not a deleted file's."""
        import sqlite3

        src, dst = sqlite3.connect(source), sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()

    def save_state(self, label: str) -> None:
        """Copy what a command changes (project, MLflow store and artifacts, cache) to saved/<label>/."""
        dest = self.root / "saved" / label
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for part in SAVED_PARTS:
            if (self.root / part).exists():
                shutil.copytree(self.root / part, dest / part, symlinks=True)
        if self.db.is_file():
            self._copy_db(self.db, dest / self.db.name)

    def restore_state(self, label: str) -> None:
        """Put saved/<label>/ back in place, at the same paths (MLflow and state.json record absolute
        ones). Prefect's home stays: every point shares it, as in the sequence scope."""
        saved = self.root / "saved" / label
        if not saved.is_dir():
            raise SystemExit(f"{saved} is missing: this work folder's reference saved no states; name a new --work")
        for part in SAVED_PARTS:
            if (self.root / part).exists():
                shutil.rmtree(self.root / part)
            if (saved / part).exists():
                shutil.copytree(saved / part, self.root / part, symlinks=True)
        if (saved / self.db.name).is_file():
            self._copy_db(saved / self.db.name, self.db)

    def ensure_mlflow_experiment(self, exp: str) -> None:
        """The experiment's artifacts in the work folder (else MLflow puts them in ./mlruns)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        if client.get_experiment_by_name(exp) is None:
            client.create_experiment(exp, artifact_location=(self.root / "mlartifacts" / exp).as_uri())


# --- the sequence of commands -----------------------------------------------------------------

def sequence(cycles: int) -> list[tuple[str, int]]:
    """("run", k): the `tidal run` that trains cycle k (k == cycles: the last run, which closes the
    MLflow parent run); ("import", k): the import of cycle k's query."""
    steps: list[tuple[str, int]] = []
    for k in range(cycles):
        steps += [("run", k), ("import", k)]
    return steps + [("run", cycles)]


def step_name(step: tuple[str, int], cycles: int) -> str:
    kind, k = step
    if kind == "import":
        return f"import cycle {k}"
    return "final run" if k == cycles else f"run cycle {k}"


def run_args(exp: str, cycles: int) -> list[str]:
    return [str(BIN / "tidal"), "run", "--set", "preset=debug", "--set", f"cycles={cycles}",
            "--set", "label_mode=human", "--set", f"experiment={exp}"]


def import_args(exp: str, annotated: Path) -> list[str]:
    return [str(BIN / "tidal"), "import-labels", str(annotated), "--experiment", exp]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


_TRUTH: dict[str, dict[str, str]] = {}


def truth(work: Work) -> dict[str, str]:
    """The data set's own label (class name) of every pool id: what the annotators answer."""
    key = str(work.repo)
    if key not in _TRUTH:
        from tidal.data.sources import load_dataset

        data = load_dataset(work.repo / "data", "digits")
        _TRUTH[key] = {i: data.classes[y] for i, y in zip(data.pool_ids, data.pool_labels.tolist())}
    return _TRUTH[key]


def write_annotated(work: Work, exp: str, cycle: int, folder: Path) -> Path:
    """Cycle k's query.csv with the label column filled (as tests/integration/test_human_loop.py
    `_write_annotated` writes it), in `folder` outside the project."""
    rows = _rows(work.repo / "runs" / exp / "cycles" / str(cycle) / "query.csv")
    labels = truth(work)
    for r in rows:
        r["label"] = labels[r["id"]]
        r["annotator"] = "kill-points"
    dest = folder / f"annotated-cycle{cycle}.csv"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def _tail(path: Path, n: int = 6) -> list[str]:
    try:
        lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []
    return [line[:300] for line in lines[-n:]]


def _stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(work: Work, tag: str, args: list[str], log: Path, kill_after: float | None = None) -> dict:
    """Run one command in its own session, its processes marked with `tag`; with kill_after,
    SIGKILL its process group then."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=work.repo, env=work.env(tag), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        limit = work.timeout if kill_after is None else min(kill_after, work.timeout)
        killed = timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(proc.pid)  # the session's group: the CLI, its Prefect server, a dvc add
            proc.wait()
            killed, timed_out = kill_after is not None, kill_after is None
        except BaseException:  # this script stopped (Ctrl-C, SIGTERM): its command stops too
            _stop_group(proc.pid)
            proc.wait()
            raise
    return {"args": [shlex.quote(a) for a in args], "rc": proc.returncode, "seconds": round(time.perf_counter() - began, 3),
            "killed": killed, "timed_out": timed_out, "log": str(log), "log_tail": _tail(log)}


def step_args(work: Work, exp: str, step: tuple[str, int], annotated_in: Path) -> list[str]:
    kind, k = step
    if kind == "run":
        return run_args(exp, work.cycles)
    return import_args(exp, write_annotated(work, exp, k, annotated_in))


def run_step(work: Work, exp: str, index: int, args: list[str], logs: Path, attempt: int,
             kill_after: float | None = None, name: str | None = None) -> list[dict]:
    """Command `index` of the sequence (its log logs/<attempt>-<kind><k>.log); with kill_after it is
    SIGKILLed then and, once killed, rerun. `name`: the point whose processes these are."""
    step = sequence(work.cycles)[index]
    log = logs / f"{attempt:02d}-{step[0]}{step[1]}.log"
    result = {"index": index, "step": step_name(step, work.cycles),
              **run_command(work, work.tag(name or exp), args, log, kill_after=kill_after)}
    if kill_after is None or not result["killed"]:
        return [result]
    result["left"] = left_by_kill(work, exp, step)
    return [result, *run_step(work, exp, index, args, logs, attempt + 1, name=name)]


def _outcome(commands: list[dict]) -> dict:
    last = commands[-1]
    if last["rc"] == 0:
        return {"commands": commands, "ok": True, "error": ""}
    why = "timed out" if last["timed_out"] else f"exited {last['rc']}"
    return {"commands": commands, "ok": False, "error": f"{last['step']} {why}: " + " | ".join(last["log_tail"])}


def run_sequence(work: Work, exp: str, kill: dict | None = None, before_each=None, after_each=None) -> dict:
    """The experiment's commands in order; `kill` = {index, delay_s}: that command is killed after
    delay_s, then rerun. before_each(i) / after_each(i) run around command i (the reference saves
    its states with them). Returns {commands, ok, error}."""
    work.ensure_mlflow_experiment(exp)
    commands: list[dict] = []
    for i, step in enumerate(sequence(work.cycles)):
        if before_each:
            before_each(i)
        delay = kill["delay_s"] if kill and kill["index"] == i else None
        done = run_step(work, exp, i, step_args(work, exp, step, work.point_dir(exp)), work.point_dir(exp),
                        len(commands) + 1, kill_after=delay)
        commands += done
        if done[-1]["rc"] != 0:
            return _outcome(commands)
        if after_each:
            after_each(i)
    return _outcome(commands)


def left_by_kill(work: Work, exp: str, step: tuple[str, int]) -> str:
    """What the killed command had done, read from what it left: where in its work the kill came."""
    from mlflow import MlflowClient

    from tidal.data.version import dvc_dir_md5, pinned_md5

    ws = work.repo / "runs" / exp
    parts = []
    if (ws / "state.json").is_file():
        state = json.loads((ws / "state.json").read_text())
        parts.append(f"state at cycle {state['cycle']}" + (", awaiting labels" if state.get("awaiting_labels") else "")
                     + f", {len(state['labeled'])} labeled, {len(state.get('pending', {}))} pending, "
                     f"{len(state.get('imports', []))} import(s)")
    else:
        parts.append("no state.json")
    if step[0] == "run":
        cycle_dir = ws / "cycles" / str(step[1])
        files = sorted(p.name for p in cycle_dir.iterdir() if p.is_file()) if cycle_dir.is_dir() else []
        parts.append(f"cycles/{step[1]}: {' '.join(files) or 'nothing'}")
    log = work.repo / "data" / "labels" / f"{exp}.csv"
    parts.append(f"labels log {len(_rows(log)) if log.is_file() else 0} rows")
    parts.append("pin " + ("matches data/" if pinned_md5(work.repo / "data.dvc") == dvc_dir_md5(work.repo / "data")
                           else "differs from data/"))
    parts += [name for name in (".lock", "import.json") if (ws / name).exists()]
    found = MlflowClient(tracking_uri=work.uri).get_experiment_by_name(exp)
    runs = MlflowClient(tracking_uri=work.uri).search_runs([found.experiment_id]) if found else []
    named = sorted(("parent" if r.data.tags.get("tidal.kind") == "experiment" else f"cycle-{r.data.tags.get('cycle')}",
                    r.info.status) for r in runs)
    parts.append("MLflow: " + (", ".join(f"{n} {st}" for n, st in named) or "no runs"))
    return "; ".join(parts)


# --- what an experiment ended with ------------------------------------------------------------

def _mlflow_snapshot(work: Work, exp: str) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=work.uri)
    found = client.get_experiment_by_name(exp)
    if found is None:
        return {"runs": [], "metrics": {}, "duplicate_steps": [], "parent_tags": {}}
    runs = client.search_runs([found.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    listed, metrics, duplicates, parent_tags = [], {}, [], {}
    for run in runs:
        tags = run.data.tags
        kind = tags.get("tidal.kind", "?")
        name = "parent" if kind == "experiment" else f"cycle-{tags.get('cycle', '?')}"
        listed.append({"run_id": run.info.run_id, "kind": kind, "name": name, "status": run.info.status,
                       "parent": tags.get("mlflow.parentRunId", "")})
        if kind == "experiment":
            parent_tags = {k: v for k, v in tags.items() if k == "data_version" or k.startswith("data_version.")}
        for key in sorted(run.data.metrics):
            history = client.get_metric_history(run.info.run_id, key)
            steps = [m.step for m in history]
            repeated = sorted({s for s in steps if steps.count(s) > 1})
            if repeated:
                duplicates.append(f"{name} ({run.info.run_id[:8]}) {key}: step(s) {repeated[:5]} "
                                  f"logged {max(steps.count(s) for s in repeated)} times")
            if not key.startswith("system/"):  # CPU/memory samples depend on timing
                metrics.setdefault(name, {})[key] = sorted([m.step, m.value] for m in history)
    return {"runs": sorted(listed, key=lambda r: r["name"]), "metrics": metrics, "duplicate_steps": duplicates,
            "parent_tags": parent_tags}


def snapshot(work: Work, exp: str) -> dict:
    """Everything the checks compare, as plain JSON-able values."""
    ws = work.repo / "runs" / exp
    state = json.loads((ws / "state.json").read_text()) if (ws / "state.json").is_file() else {}
    curve = _rows(ws / "learning_curve.csv") if (ws / "learning_curve.csv").is_file() else []
    queries = {}
    for k in range(work.cycles):
        query = ws / "cycles" / str(k) / "query.csv"
        queries[str(k)] = [r["id"] for r in _rows(query)] if query.is_file() else None
    log = work.repo / "data" / "labels" / f"{exp}.csv"
    labels_log = [[r["id"], r["label"], r["cycle"]] for r in _rows(log)] if log.is_file() else None
    return json.loads(json.dumps({  # plain JSON values: equal to a snapshot read back from a file
        "curve": curve,
        "queries": queries,
        "labels_log": labels_log,
        "state": {
            "cycle": state.get("cycle"),
            "labeled": state.get("labeled"),
            "pending": sorted(state.get("pending", {})),
            "awaiting_labels": state.get("awaiting_labels"),
            "history": [[h["cycle"], h["n_labeled"], h["accuracy"], h["n_queried"]]
                        for h in state.get("history", [])],
            # The imports that changed labels: a rerun of an import that had finished before its kill
            # is recorded too, as one that changed nothing (0 new, all unchanged), as any repeated import is.
            "imports": [[i.get("new"), i.get("relabeled"), i.get("skipped"), i.get("still_pending")]
                        for i in state.get("imports", []) if i.get("new") or i.get("relabeled")],
        },
        "tracking": state.get("tracking", {}),
        "data_version": state.get("data_version"),
        "mlflow": _mlflow_snapshot(work, exp),
    }))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two JSON-like values first differ, in words."""
    if type(a) is not type(b):
        return f"{path or 'value'}: reference {str(a)[:120]}, here {str(b)[:120]}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}/{key}: {'only here' if key not in a else 'missing here'}"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}/{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path or 'list'}: reference has {len(a)} entries, here {len(b)}"
        for n, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{n}]")
    return f"{path or 'value'}: reference {str(a)[:120]}, here {str(b)[:120]}"


def _same(ref: Any, got: Any) -> dict:
    return {"passed": ref == got, "detail": "" if ref == got else _first_difference(ref, got)}


def _proc_alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def point_processes(work: Work, exp: str) -> list[dict]:
    """Live processes of the point: its marker in their environment, or its folder in their command."""
    tag = f"{MARKER_ENV}={work.tag(exp)}".encode()
    folder = str(work.point_dir(exp)).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if (tag in environ.split(b"\0") or folder in cmdline) and _proc_alive(pid):
            found.append({"pid": int(pid), "cmd": cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]})
    return found


DVC_CLEAN = "clean"


def dvc_status(work: Work) -> str:
    """`dvc status data.dvc`: DVC_CLEAN when up to date, else what it printed."""
    status = subprocess.run([str(BIN / "dvc"), "status", "data.dvc"], cwd=work.repo, env=work.env(work.tag("check")),
                            capture_output=True, text=True, timeout=300)
    if status.returncode == 0 and "up to date" in status.stdout:
        return DVC_CLEAN
    return (status.stdout + status.stderr).strip() or f"exit {status.returncode}"


def check_point(work: Work, exp: str, ref: dict, run: dict, grace_s: float = 15.0, name: str | None = None,
                final: bool = True) -> dict[str, dict]:
    """Every check of CHECKS on experiment `exp`, against the reference snapshot `ref`; `name`: the
    point whose processes are looked for (default exp). final=False: `ref` is the reference's state
    after a command before the end, where the runs are compared with its runs instead of with the
    finished experiment's (one parent, one FINISHED child per cycle)."""
    from tidal.data.version import dvc_dir_md5, pinned_md5

    checks: dict[str, dict] = {}
    deadline = time.monotonic() + grace_s  # a killed group's members take a moment to go
    left = point_processes(work, name or exp)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = point_processes(work, name or exp)
    checks["processes"] = {"passed": not left, "detail": "; ".join(f"pid {p['pid']}: {p['cmd']}" for p in left)}
    for p in left:  # ours: stop them, after recording them
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except OSError:
            pass
    checks["sequence"] = {"passed": run["ok"], "detail": run["error"]}
    got = snapshot(work, exp)
    for key in ("curve", "queries", "labels_log", "state"):
        checks[key] = _same(ref[key], got[key])
    pinned, actual = pinned_md5(work.repo / "data.dvc"), dvc_dir_md5(work.repo / "data")
    checks["dvc_pin"] = {"passed": pinned == actual,
                         "detail": "" if pinned == actual else f"data.dvc pins {pinned}, data/ is {actual}"}
    status = dvc_status(work)
    if final:
        clean = status == DVC_CLEAN
        checks["dvc_status"] = {"passed": clean, "detail": "" if clean else status[:500]}
    else:  # before the first import the data matches its pin but is not in DVC's cache yet: as the reference's
        same = status == ref["dvc_status"]
        checks["dvc_status"] = {"passed": same, "detail": "" if same else
                                f"reference: {ref['dvc_status'][:240]}; here: {status[:240]}"}

    ml = got["mlflow"]
    problems = []
    parents = [r for r in ml["runs"] if r["kind"] == "experiment"]
    cycles = [r for r in ml["runs"] if r["kind"] == "cycle"]
    if final:
        if len(parents) != 1:
            problems.append(f"{len(parents)} parent runs")
        names = sorted(r["name"] for r in cycles)
        if names != [f"cycle-{k}" for k in range(work.cycles)]:
            problems.append(f"child runs {names}")
        problems += [f"{r['name']} {r['run_id'][:8]} is {r['status']}" for r in ml["runs"] if r["status"] != "FINISHED"]
    else:
        def listed(runs: list[dict]) -> list[tuple[str, str, str]]:
            return sorted((r["kind"], r["name"], r["status"]) for r in runs)

        if listed(ml["runs"]) != listed(ref["mlflow"]["runs"]):
            problems.append(f"runs {listed(ml['runs'])}, reference {listed(ref['mlflow']['runs'])}")
    other = [r for r in ml["runs"] if r["kind"] not in ("experiment", "cycle")]
    problems += [f"a run of kind {r['kind']}" for r in other]
    tracking = got["tracking"]
    if parents and tracking.get("parent_run_id") != parents[0]["run_id"]:
        problems.append("state.json names another parent run")
    if parents and any(r["parent"] != parents[0]["run_id"] for r in cycles):
        problems.append("a child run of another parent")
    recorded = tracking.get("cycle_runs", {})
    if sorted(recorded.values()) != sorted(r["run_id"] for r in cycles):
        problems.append(f"state.json records cycle runs {recorded}")
    checks["mlflow_runs"] = {"passed": not problems, "detail": "; ".join(problems)}
    checks["mlflow_steps"] = {"passed": not ml["duplicate_steps"], "detail": "; ".join(ml["duplicate_steps"])}
    checks["mlflow_metrics"] = _same(ref["mlflow"]["metrics"], ml["metrics"])
    tags = ml["parent_tags"]
    numbered = sorted(k for k in tags if k != "data_version")
    want = sorted(k for k in ref["mlflow"]["parent_tags"] if k != "data_version")
    tag_problems = []
    if numbered != want:
        tag_problems.append(f"tags {numbered}, reference {want}")
    if tags.get("data_version") != got["data_version"]:
        tag_problems.append(f"data_version tag {tags.get('data_version')}, state.json {got['data_version']}")
    if numbered and tags.get(max(numbered, key=lambda k: int(k.split(".")[1]))) != got["data_version"]:
        tag_problems.append("the last data_version.<n> is not state.json's version")
    checks["mlflow_tags"] = {"passed": not tag_problems, "detail": "; ".join(tag_problems)}
    ws = work.repo / "runs" / exp
    leftovers = [name for name in (".lock", "import.json") if (ws / name).exists()]
    checks["lock_journal"] = {"passed": not leftovers, "detail": ", ".join(leftovers) + (" left" if leftovers else "")}
    return {name: checks[name] for name in CHECKS}


# --- reference, points, report ----------------------------------------------------------------

def reference(work: Work, scope: str = "sequence") -> dict:
    """The uninterrupted experiment: its commands' times, its end snapshot, the snapshot after each
    command ("after") and its state saved before each command (saved/before-<i>/) and at its end
    (saved/end/), all kept in the work folder."""
    saved = work.root / "reference.json"
    if saved.is_file():  # its times; what it ended with is read again, as this version compares it
        if scope == "command" and (work.root / "saved" / "end").is_dir():
            # A command-scope point stopped part way leaves the reference's experiment changed. (The
            # sequence scope keeps a stopped point's experiment beside it, under its own name.)
            work.restore_state("end")
        return {**json.loads(saved.read_text()), "snapshot": snapshot(work, REFERENCE)}
    print(f"[kill_points] reference: {len(sequence(work.cycles))} commands, uninterrupted ...", flush=True)
    began = time.perf_counter()
    after: list[dict] = []
    run = run_sequence(work, REFERENCE, before_each=lambda i: work.save_state(f"before-{i}"),
                       after_each=lambda i: after.append({**snapshot(work, REFERENCE), "dvc_status": dvc_status(work)}))
    if not run["ok"]:
        raise RuntimeError(f"the reference experiment failed: {run['error']}")
    work.save_state("end")
    ref = {"commands": run["commands"], "durations": [c["seconds"] for c in run["commands"]],
           "snapshot": snapshot(work, REFERENCE), "after": after, "wall_s": round(time.perf_counter() - began, 1)}
    checks = check_point(work, REFERENCE, ref["snapshot"], run)
    bad = {k: v["detail"] for k, v in checks.items() if not v["passed"]}
    if bad:
        raise RuntimeError(f"the reference experiment fails its own checks: {bad}")
    _atomic_write(saved, json.dumps(ref, indent=1) + "\n")
    print(f"[kill_points] reference done in {ref['wall_s']:.0f} s: "
          + ", ".join(f"{step_name(s, work.cycles)} {d:.1f} s" for s, d in zip(sequence(work.cycles), ref["durations"])),
          flush=True)
    return ref


def draw(seed: int, point: int, n_steps: int) -> tuple[int, float]:
    """Point k's command (index into the sequence) and where in its reference time it is killed."""
    rng = random.Random(f"kill-points:{seed}:{point}")
    return rng.randrange(n_steps), rng.random()


def _experiment_name(work: Work, point: int) -> str:
    """kp-<k>; kp-<k>-try<n> when a kept work folder holds an unfinished attempt of the point."""
    name, n = f"kp-{point}", 1
    while (work.repo / "runs" / name).exists() or work.point_dir(name).exists():
        n += 1
        name = f"kp-{point}-try{n}"
    return name


def run_point(work: Work, ref: dict, seed: int, point: int, scope: str = "sequence") -> dict:
    """Kill point `point`: in the sequence scope the whole experiment as `kp-<k>` with its drawn
    command killed, checked at its end; in the command scope the reference's own experiment from its
    state before the drawn command, that command killed and rerun, checked right after it."""
    steps = sequence(work.cycles)
    index, fraction = draw(seed, point, len(steps))
    delay = fraction * ref["durations"][index]
    name = _experiment_name(work, point)
    exp = name if scope == "sequence" else REFERENCE
    print(f"[kill_points] point {point} ({name}): SIGKILL {step_name(steps[index], work.cycles)} after "
          f"{delay:.2f} s of its {ref['durations'][index]:.1f} s ...", flush=True)
    began = time.perf_counter()
    if scope == "sequence":
        run = run_sequence(work, exp, kill={"index": index, "delay_s": delay})
        checks = check_point(work, exp, ref["snapshot"], run)
    else:
        if "after" not in ref:
            raise SystemExit(f"the reference in {work.root} saved no states (an older version made it); "
                             "name a new --work")
        work.restore_state(f"before-{index}")
        args = step_args(work, exp, steps[index], work.point_dir(REFERENCE))
        run = _outcome(run_step(work, exp, index, args, work.point_dir(name), 1, kill_after=delay, name=name))
        last = index == len(steps) - 1
        checks = check_point(work, exp, ref["snapshot"] if last else ref["after"][index], run, name=name, final=last)
    killed = next((c for c in run["commands"] if c["index"] == index), None)
    record = {
        "point": point, "seed": seed, "scope": scope, "experiment": exp, "cycles": work.cycles,
        "killed_step": step_name(steps[index], work.cycles), "killed_index": index,
        "killed_command": " ".join(killed["args"]) if killed else "",
        "fraction": round(fraction, 6), "delay_s": round(delay, 3),
        "reference_duration_s": ref["durations"][index],
        "killed": bool(killed and killed["killed"]),
        "exit_before_kill": None if not killed or killed["killed"] else killed["rc"],
        "killed_during": killed["log_tail"] if killed else [],
        "left_by_kill": killed.get("left", "") if killed else "",
        "commands": [{k: c[k] for k in ("index", "step", "rc", "seconds", "killed", "timed_out")}
                     for c in run["commands"]],
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
        "failed": [name for name, c in checks.items() if not c["passed"]],
        "wall_s": round(time.perf_counter() - began, 1),
        "work": str(work.root),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    verdict = "passed" if record["passed"] else "FAILED " + ", ".join(record["failed"])
    print(f"[kill_points] point {point}: {verdict} ({'killed' if record['killed'] else 'ended before the kill'}, "
          f"{record['wall_s']:.0f} s)", flush=True)
    return record


def load_points(points_dir: Path) -> list[dict]:
    found = []
    for path in points_dir.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda p: (p.get("seed", 0), p["point"]))


def _curve_accuracy(row: dict[str, str]) -> str:
    """A learning_curve.csv row's accuracy: `accuracy`, or `test_accuracy` in the reference.json
    committed before the pipeline renamed it."""
    return row["accuracy"] if "accuracy" in row else row["test_accuracy"]


def rebuild_report(out: Path, command: str, ref: dict | None) -> None:
    points = load_points(out / "points")
    passed = [p for p in points if p["passed"]]
    failed = [p for p in points if not p["passed"]]
    not_killed = [p for p in points if not p["killed"]]
    cycles = points[0]["cycles"] if points else (len(ref["snapshot"]["queries"]) if ref else 3)
    scope = points[0].get("scope", "sequence") if points else "sequence"
    what = ("then finishes the experiment (rerunning that command) and compares it with an uninterrupted "
            "reference" if scope == "sequence" else
            "starting from the uninterrupted reference's saved state before that command, then reruns the "
            "command and compares the state right after it with the reference's at the same place "
            "(`--scope command`)")
    lines = ["# Crash safety at random kill points", "",
             f"Each point SIGKILLs one command of a {cycles}-cycle human-mode debug experiment (`tidal run` / "
             "`tidal import-labels`, MLflow tracking on, each run with its own temporary Prefect server, "
             f"in a git + DVC copy of the project) after a random delay, {what} "
             "(`tests/integration/kill_points.py`).", "",
             "Produced by (from the repository root):", "", "```bash", command, "```", "",
             f"Points run: **{len(points)}**; passed: **{len(passed)}**; failed: **{len(failed)}**"
             + (f"; {len(not_killed)} of them ended before their kill came (nothing was killed)." if not_killed
                else "."), ""]
    if points:
        lines += ["| point | seed | command killed | killed after (s) | of its reference (s) | wall (s) | result |",
                  "|---|---|---|---|---|---|---|"]
        for p in points:
            result = "passed" if p["passed"] else "**failed**: " + ", ".join(p["failed"])
            lines.append(f"| {p['point']} | {p['seed']} | {p['killed_step']} | {p['delay_s']:.2f} | "
                         f"{p['reference_duration_s']:.1f} | {p['wall_s']:.0f} | {result} |")
        lines += ["", "## Where the kills came", "",
                  "What each killed command had left (read before the rerun), and the last line it had printed:", ""]
        for p in points:
            if not p["killed"]:
                lines.append(f"- point {p['point']}: the command ended before its kill (exit {p['exit_before_kill']})")
                continue
            last = (p["killed_during"][-1] if p["killed_during"] else "(nothing)")[-160:].replace("`", "'")
            lines.append(f"- point {p['point']}, {p['killed_step']} at {p['delay_s']:.2f} s: "
                         f"{p.get('left_by_kill') or '?'}. Last line: `{last}`")
        lines.append("")
    if failed:
        lines += ["## Failures", ""]
        for p in failed:
            lines.append(f"Point {p['point']} (`{p['experiment']}`, {p['killed_step']} killed after "
                         f"{p['delay_s']:.2f} s):")
            lines += [f"- `{name}`: {p['checks'][name]['detail']}" for name in p["failed"]]
            lines.append("")
    lines += ["## Checks", "", "Per point, against the reference:", ""]
    lines += [f"- `{name}`: {CHECK_TEXT[name]}" for name in CHECKS]
    lines.append("")
    if ref is not None:
        steps = sequence(len(ref["snapshot"]["queries"]))
        lines += ["## Reference", "",
                  "Times of the uninterrupted commands (the delay of a point is drawn uniformly over its command's "
                  "time here; times depend on the machine's load):", "",
                  "| command | seconds |", "|---|---|"]
        lines += [f"| {step_name(s, len(steps) // 2)} | {d:.1f} |" for s, d in zip(steps, ref["durations"])]
        curve = ref["snapshot"]["curve"]
        lines += ["", "Learning curve: " + ", ".join(f"{r['n_labeled']} labels {_curve_accuracy(r)}" for r in curve)
                  + ".", ""]
    walls = [p["wall_s"] for p in points]
    if walls:
        lines += [f"Wall time per point: mean {sum(walls) / len(walls):.0f} s, min {min(walls):.0f} s, "
                  f"max {max(walls):.0f} s.", ""]
    lines += [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.", "",
              "Files: `points/<k>.json` (one per finished point: the command killed, the delay, each command's exit "
              "status and time, every check with what differed). Not committed: the scratch work folder "
              "(project copy, `mlflow.db`, Prefect home).", ""]
    _atomic_write(out / "README.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the kill points not run yet; return {ran, skipped, passed, failed, out, work}."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "points").mkdir(parents=True, exist_ok=True)
    gitignore = out / ".gitignore"
    if not gitignore.exists():
        _atomic_write(gitignore, "# scratch of tests/integration/kill_points.py, if --work points here\nwork/\n*.db\n*.tmp\n")
    command = "OMP_NUM_THREADS=1 .venv/bin/python tests/integration/kill_points.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    todo = [k for k in range(args.points) if not (out / "points" / f"{k}.json").is_file()]
    for saved in load_points(out / "points"):
        was = (saved["seed"], saved["cycles"], saved.get("scope", "sequence"))
        if was != (args.seed, args.cycles, args.scope):
            raise SystemExit(f"{out}/points/{saved['point']}.json was run with --seed {was[0]} --cycles {was[1]} "
                             f"--scope {was[2]}, now --seed {args.seed} --cycles {args.cycles} --scope "
                             f"{args.scope}: use another --out")
    skipped = [k for k in range(args.points) if k not in todo]
    saved_ref = out / "reference.json"
    ref = json.loads(saved_ref.read_text()) if saved_ref.is_file() else None
    if not todo:
        rebuild_report(out, command, ref)
        return {"ran": [], "skipped": skipped, "out": str(out), "work": None, **_verdicts(out)}
    temporary = args.work is None
    root = Path(tempfile.mkdtemp(prefix="tidal-kill-points-")) if temporary else Path(args.work).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()) and not (root / WORK_MARKER).is_file():
        raise SystemExit(f"--work {root} is not empty and not a kill-points work folder; name a new one")
    work = Work(root, args.cycles, args.timeout)
    ran = []
    try:
        if not (root / WORK_MARKER).is_file() or not (root / "reference.json").is_file():
            print(f"[kill_points] building the project copy in {root} ...", flush=True)
            for name in ("repo", "points", "prefect-home", "mlartifacts", "cache", "mlflow.db"):
                target = root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            work.build()
            (root / WORK_MARKER).write_text(json.dumps({"cycles": args.cycles}) + "\n")
        elif json.loads((root / WORK_MARKER).read_text())["cycles"] != args.cycles:
            raise SystemExit(f"--work {root} holds a {json.loads((root / WORK_MARKER).read_text())['cycles']}-cycle "
                             f"reference, not {args.cycles}; name another work folder")
        ref = reference(work, args.scope)
        _atomic_write(saved_ref, json.dumps({k: ref[k] for k in ("durations", "snapshot", "wall_s")}, indent=1) + "\n")
        for k in todo:
            record = run_point(work, ref, args.seed, k, args.scope)
            _atomic_write(out / "points" / f"{k}.json", json.dumps(record, indent=1) + "\n")
            ran.append(k)
            rebuild_report(out, command, ref)
        if args.scope == "command":
            work.restore_state("end")  # a kept work folder holds the reference's end, as after a sequence
        rebuild_report(out, command, ref)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    result = {"ran": ran, "skipped": skipped, "out": str(out), "work": None if temporary else str(root),
              **_verdicts(out)}
    print(f"[kill_points] ran {len(ran)}, skipped {len(skipped)} finished point(s); passed {len(result['passed'])}, "
          f"failed {len(result['failed'])}; {out / 'README.md'}", flush=True)
    return result


def _verdicts(out: Path) -> dict[str, list[int]]:
    points = load_points(out / "points")
    return {"passed": [p["point"] for p in points if p["passed"]],
            "failed": [p["point"] for p in points if not p["passed"]]}


if __name__ == "__main__":
    from tidal.cli import exit_on_sigterm

    exit_on_sigterm()  # `kill PID` ends the run through `finally` (its temporary work folder goes)
    main()
