"""Many experiments at once: 8 experiments (4 strategies × 2 seeds, the debug preset) deployed and
triggered together on 2 workers, against the team stack (PostgreSQL-backed Prefect and MLflow
servers, `tidal stack up`) and against the sqlite default (a Prefect server on sqlite, MLflow
tracking straight into one sqlite file, as `tidal run` does out of the box).

For each backend: the work pool and prefect.yaml's deployments, 8 flow runs of
`tidal-experiment/nightly-experiment` created at once (each its own experiment, one shared
data_root), two `prefect worker` processes; then, per experiment, the checks: the flow run
COMPLETED, exactly one MLflow parent run and one child run per cycle, all FINISHED, no metric
with one step twice in any run, state.json with every cycle and each cycle's query.csv there.

One JSON file per backend under OUT/<backend>.json (skipped when present: an interrupted run
resumes); OUT/README.md is rebuilt from whatever is there.

    python benchmarks/load.py                       # both backends
    python benchmarks/load.py --backends sqlite     # one
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "load"
STRATEGIES = ["random", "entropy", "margin", "tidal-entropy"]
SEEDS = [0, 1]
CYCLES = 2
BACKENDS = ("postgres", "sqlite")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json(url: str, method: str = "GET", body: Any = None) -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _wait(check, seconds: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except Exception:  # a server still starting refuses connections
            pass
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {seconds:.0f} s")


def _run(cmd: list[str], env: dict, cwd: Path) -> None:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def _client_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DO_NOT_TRACK": "1", "CI": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(work / "prefect-home"), "PWD": str(REPO),
                "OMP_NUM_THREADS": "1"})
    return env


def _experiments() -> list[tuple[str, int, str]]:
    return [(s, seed, f"load-{s}-s{seed}") for s in STRATEGIES for seed in SEEDS]


def _checks(work: Path, tracking_uri: str, runs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per experiment: what the flow run, MLflow and the workspace hold."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for strategy, seed, name in _experiments():
        found: dict[str, Any] = {"flow_run": runs[name]["state"]["type"]}
        exp = client.get_experiment_by_name(name)
        mruns = client.search_runs([exp.experiment_id]) if exp else []
        parents = [r for r in mruns if r.data.tags.get("tidal.kind") == "experiment"]
        children = [r for r in mruns if r.data.tags.get("tidal.kind") == "cycle"]
        dup_steps = 0
        for r in parents + children:
            for key in r.data.metrics:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                dup_steps += len(steps) - len(set(steps))
        state_path = work / "runs" / name / "state.json"
        history = json.loads(state_path.read_text())["history"] if state_path.is_file() else []
        queries = [Path(h["query"]).is_file() for h in history]
        found.update({
            "parents": len(parents), "children": sorted(int(r.data.tags["cycle"]) for r in children),
            "all_finished": all(r.info.status == "FINISHED" for r in parents + children),
            "duplicate_metric_steps": dup_steps, "cycles_in_state": len(history),
            "query_files": sum(queries)})
        found["ok"] = (found["flow_run"] == "COMPLETED" and found["parents"] == 1
                       and found["children"] == list(range(CYCLES)) and found["all_finished"]
                       and dup_steps == 0 and len(history) == CYCLES and all(queries))
        out[name] = found
    return out


def run_backend(backend: str, work: Path, workers: int) -> dict[str, Any]:
    from tidal import stack

    work.mkdir(parents=True, exist_ok=True)
    env = _client_env(work)
    procs: list[subprocess.Popen] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    stack_dir = work / "stack"
    try:
        if backend == "postgres":
            state = stack.up(stack_dir, _port(), _port(), project=None)
            env.update(state["env"])
        else:
            port = _port()
            env.update({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
            server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}"}
            procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)], env=server_env, start_new_session=True,
                                          stdout=open(logs / "prefect.log", "wb"), stderr=subprocess.STDOUT))
            _wait(lambda: _json(env["PREFECT_API_URL"] + "/health"), 180, "Prefect server")
        api = env["PREFECT_API_URL"]
        _run([str(BIN / "prefect"), "work-pool", "create", "tidal-pool", "--type", "process", "--overwrite"], env, REPO)
        _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "nightly-experiment"], env, REPO)
        _run([str(BIN / "tidal"), "data", "--set", f"data_root={work / 'data'}"], env, work)
        deployment = _json(f"{api}/deployments/name/tidal-experiment/nightly-experiment")
        start = time.perf_counter()
        runs = {}
        for strategy, seed, name in _experiments():
            overrides = ["preset=debug", f"cycles={CYCLES}", f"strategy={strategy}", f"seed={seed}",
                         f"experiment={name}", f"runs_dir={work / 'runs'}", f"data_root={work / 'data'}"]
            runs[name] = _json(f"{api}/deployments/{deployment['id']}/create_flow_run", "POST",
                               {"parameters": {"params_path": "params.yaml", "overrides": overrides}})
        for k in range(workers):
            procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "tidal-pool",
                                           "--type", "process", "--limit", "1", "--name", f"load-worker-{k}"],
                                          env=env, cwd=REPO, start_new_session=True,
                                          stdout=open(logs / f"worker-{k}.log", "wb"), stderr=subprocess.STDOUT))

        def finished() -> dict | None:
            now = {n: _json(f"{api}/flow_runs/{r['id']}") for n, r in runs.items()}
            terminal = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            return now if all(r["state"]["type"] in terminal for r in now.values()) else None

        final = _wait(finished, 3600, "all flow runs", every=3)
        wall = time.perf_counter() - start
        checks = _checks(work, env["MLFLOW_TRACKING_URI"], final)
        messages = {n: (r["state"].get("message") or "")[:300] for n, r in final.items()
                    if r["state"]["type"] != "COMPLETED"}
        return {"backend": backend, "experiments": len(runs), "workers": workers, "cycles": CYCLES,
                "wall_s": round(wall, 1), "completed": sum(c["flow_run"] == "COMPLETED" for c in checks.values()),
                "passed": sum(c["ok"] for c in checks.values()), "checks": checks, "failure_messages": messages,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
        if backend == "postgres":
            stack.down(stack_dir)


def rebuild_report(out: Path, command: str) -> None:
    rows = [json.loads(p.read_text()) for b in BACKENDS if (p := out / f"{b}.json").is_file()]
    lines = ["# Many experiments at once", "",
             f"{len(_experiments())} experiments ({', '.join(STRATEGIES)} × seeds {SEEDS}, the debug preset, "
             f"{CYCLES} cycles each) created together as flow runs of `tidal-experiment/nightly-experiment` and "
             "run by 2 process workers (`--limit 1` each), per backend (`benchmarks/load.py`).", "",
             "Produced by (from the repository root):", "", "```bash", command, "```", "",
             "| backend | experiments | flow runs completed | all checks passed | wall (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['experiments']} | {r['completed']} | {r['passed']} | {r['wall_s']} |")
    lines += ["", "Checks per experiment: the flow run COMPLETED, one MLflow parent run and one child run per "
              "cycle, all FINISHED, no metric step written twice, state.json with every cycle, each cycle's "
              "query.csv present.", ""]
    for r in rows:
        bad = {n: c for n, c in r["checks"].items() if not c["ok"]}
        if bad:
            lines.append(f"**{r['backend']}**: failed checks: " + "; ".join(
                f"{n}: {c}" for n, c in bad.items()))
            for n, m in r["failure_messages"].items():
                lines.append(f"- {n}: {m}")
            lines.append("")
    for r in rows:
        lines.append(f"{r['backend']}: {r['machine']}, finished {r['finished_at']}.")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: postgres,sqlite")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/load.py" + (
        f" --backends {args.backends}" if args.backends != ",".join(BACKENDS) else "")
    for backend in args.backends.split(","):
        if (out / f"{backend}.json").is_file():
            print(f"[load] {backend}: done before, skipped")
            continue
        # Under /tmp: PostgreSQL runs as `postgres`, which must be able to enter every parent.
        work = Path(tempfile.mkdtemp(prefix=f"tidal-load-{backend}-"))
        os.chmod(work, 0o755)
        print(f"[load] {backend}: in {work} ...", flush=True)
        result = run_backend(backend, work, args.workers)
        (out / f"{backend}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"[load] {backend}: {result['completed']}/{result['experiments']} completed, "
              f"{result['passed']} passed every check, {result['wall_s']} s", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    rebuild_report(out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
