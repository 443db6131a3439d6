"""A team's stack on this machine: PostgreSQL, a Prefect server and an MLflow server on it.

    tidal stack up [--dir .stack] [--prefect-port 4200] [--mlflow-port 5000]
    tidal stack status [--dir .stack]
    tidal stack down [--dir .stack]

PostgreSQL is the machine's own server (Debian's `postgresql` package: `initdb` and `postgres` under
/usr/lib/postgresql/<version>/bin), a cluster of its own in DIR/pg listening only on a unix socket
there. Not the `pgserver` wheel: its bundled server has no contrib extensions, and Prefect's
PostgreSQL schema needs `pg_trgm`. PostgreSQL refuses to run as root, so as root the cluster runs
as the `postgres` user (every parent of DIR must then be enterable by it). Prefect's
server stores its state in the database `prefect`, MLflow's tracking server in `mlflow` with its
artifacts in DIR/artifacts; both bind to 127.0.0.1. The servers run in the background, their
output in DIR/logs/, their process ids in DIR/stack.json, so `down` and `status` find them from any
shell.

Both servers ask for credentials, generated at the first `up` of DIR and kept in
DIR/credentials.json (mode 0600): Prefect's server checks `PREFECT_SERVER_API_AUTH_STRING` on
every API call but its health check; MLflow runs its basic-auth app (`--app-name basic-auth`,
users in the database `mlflow_auth`, the admin created from the generated password on the first
start). Without them any user of the machine could create deployments (whose pull steps run shell
commands on the worker) or replace the cycle models people load. `up` prints the variables that
point clients (`tidal run`, workers, `prefect deploy`) at the stack, credentials included;
DIR/stack.json holds them too and is also 0600. Secrets reach the servers through their
environment, never their command lines (which every user can read in /proc).

With `--project DIR` (a folder with prefect.yaml) `up` also creates the work pool, deploys
prefect.yaml's deployments and starts a worker. Prefect and MLflow run as their own
command-line programs, never imported.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
MLFLOW_AUTH_CONFIG = "mlflow-auth.ini"
MLFLOW_ADMIN = "admin"
DATABASES = ("prefect", "mlflow", "mlflow_auth")


class StackError(RuntimeError):
    """The stack cannot be started, or a part of it did not come up."""


def _bin(name: str) -> str:
    """The console script installed beside the running Python (the venv need not be active)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else name


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian layout), or the ones on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise StackError("no PostgreSQL server found: install Debian's `postgresql` package "
                         "(apt-get install postgresql)")
    return Path(on_path).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses root: as root, run its programs as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start_postgres(dir_: Path, log: Path) -> subprocess.Popen:
    pg = dir_ / "pg"
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        pg.mkdir(mode=0o700, exist_ok=True)
        os.chown(pg, user.pw_uid, user.pw_gid)
        blocked = [str(p) for p in [dir_, *dir_.parents] if not os.stat(p).st_mode & 0o001]
        if blocked:
            raise StackError(f"PostgreSQL runs as the `postgres` user, who cannot enter {blocked[0]}; "
                             f"choose a --dir whose parents everyone may enter (e.g. under /srv or /tmp)")
    if not (pg / "PG_VERSION").is_file():
        subprocess.run(_as_postgres([str(_pg_bin() / "initdb"), "-D", str(pg), "-A", "trust", "-U", "postgres",
                                     "--no-instructions"]), check=True, capture_output=True, text=True)
    return _start(_as_postgres([str(_pg_bin() / "postgres"), "-D", str(pg), "-k", str(pg),
                                "-c", "listen_addresses="]), dict(os.environ), log)


def _wait_postgres(dir_: Path, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"PostgreSQL exited with code {proc.returncode}; see {log}")
        if subprocess.run([str(_pg_bin() / "pg_isready"), "-h", str(dir_ / "pg"), "-U", "postgres"],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    raise StackError(f"PostgreSQL did not accept connections within {seconds:.0f} s; see {log}")


def _psql(dir_: Path, sql: str) -> str:
    return subprocess.run([str(_pg_bin() / "psql"), "-h", str(dir_ / "pg"), "-U", "postgres", "-At", "-c", sql],
                          check=True, capture_output=True, text=True).stdout


def urls(prefect_port: int, mlflow_port: int) -> dict[str, str]:
    return {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (0600), also when it existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def credentials(dir_: Path) -> dict[str, str]:
    """The stack's credentials: generated at the first `up` of dir_, the same ones afterwards
    (MLflow keeps its admin's password in its user database from the first start on)."""
    path = dir_ / CREDENTIALS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    found = {"prefect_auth_string": f"tidal:{secrets.token_urlsafe(24)}",
             "mlflow_username": MLFLOW_ADMIN, "mlflow_password": secrets.token_urlsafe(24),
             "mlflow_secret_key": secrets.token_urlsafe(32)}
    write_private(path, json.dumps(found, indent=2) + "\n")
    return found


def client_env(creds: dict[str, str]) -> dict[str, str]:
    """What Prefect and MLflow clients read their credentials from."""
    return {"PREFECT_API_AUTH_STRING": creds["prefect_auth_string"],
            "MLFLOW_TRACKING_USERNAME": creds["mlflow_username"],
            "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"]}


def prefect_server_env(creds: dict[str, str]) -> dict[str, str]:
    """The Prefect server's side: every API call but the health check must carry the string."""
    return {"PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth_string"]}


def mlflow_auth_env(creds: dict[str, str], config: Path, database_uri: str) -> dict[str, str]:
    """The environment of `mlflow server --app-name basic-auth`: its config file (written here,
    0600), the admin's password for the first start and the key of its CSRF tokens."""
    write_private(config, "[mlflow]\n"
                          "default_permission = READ\n"
                          f"database_uri = {database_uri}\n"
                          f"admin_username = {creds['mlflow_username']}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_secret_key"]}


def _wait(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{url} did not come up: its server exited with code {proc.returncode}; "
                             f"see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {seconds:.0f} s; see {log}")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A session of its own: `down` stops the server and everything it started.
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_state(dir_: str | Path) -> dict[str, Any] | None:
    path = Path(dir_) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def up(dir_: str | Path = ".stack", prefect_port: int = 4200, mlflow_port: int = 5000,
       timeout_s: float = 180, project: str | Path | None = None) -> dict[str, Any]:
    """Start PostgreSQL, the Prefect server and the MLflow server; with `project` (a folder with
    prefect.yaml), also its work pool, its deployments and a worker. Returns the stack's state."""
    dir_ = Path(dir_).resolve()
    state = read_state(dir_)
    if state and any(_alive(pid) for pid in state["pids"].values()):
        raise StackError(f"a stack is already running from {dir_} (see `tidal stack status --dir {dir_}`); "
                         f"stop it with `tidal stack down --dir {dir_}`")
    dir_.mkdir(parents=True, exist_ok=True)
    logs = dir_ / "logs"
    creds = credentials(dir_)
    state = {"dir": str(dir_), "pids": {}, "env": {**urls(prefect_port, mlflow_port), **client_env(creds)}}

    def started(name: str, proc: subprocess.Popen) -> None:
        state["pids"][name] = proc.pid  # saved at once: `down` stops whatever has started
        write_private(dir_ / STATE_FILE, json.dumps(state, indent=2) + "\n")  # it holds the credentials

    try:
        postgres = _start_postgres(dir_, logs / "postgres.log")
        started("postgres", postgres)
        _wait_postgres(dir_, postgres, logs / "postgres.log", timeout_s)
        existing = _psql(dir_, "select datname from pg_database;").split()
        for name in DATABASES:
            if name not in existing:
                _psql(dir_, f"create database {name};")
        socket_dir = str(dir_ / "pg")
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_HOME": str(dir_ / "prefect-home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@/prefect?host={socket_dir}"}
        env.pop("PREFECT_API_URL", None)
        # The UI's own API address: without it the browser's calls go to :4200 whatever the port.
        ui = {"PREFECT_UI_API_URL": state["env"]["PREFECT_API_URL"]}
        prefect = _start([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                         {**env, **ui, **prefect_server_env(creds)}, logs / "prefect.log")
        started("prefect", prefect)
        # Clients upload artifacts through the server: nobody else needs to see the files.
        (dir_ / "artifacts").mkdir(exist_ok=True)
        (dir_ / "artifacts").chmod(0o700)
        mlflow_env = {**env, **mlflow_auth_env(creds, dir_ / MLFLOW_AUTH_CONFIG,
                                               f"postgresql+psycopg2://postgres@/mlflow_auth?host={socket_dir}")}
        mlflow = _start([_bin("mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
                         f"postgresql+psycopg2://postgres@/mlflow?host={socket_dir}",
                         "--artifacts-destination", str(dir_ / "artifacts"), "--host", "127.0.0.1",
                         "--port", str(mlflow_port), "--workers", "1"], mlflow_env, logs / "mlflow.log")
        started("mlflow", mlflow)
        _wait(f"http://127.0.0.1:{prefect_port}/api/health", timeout_s, prefect, logs / "prefect.log")
        _wait(f"http://127.0.0.1:{mlflow_port}/health", timeout_s, mlflow, logs / "mlflow.log")
        if project is not None:
            worker_env = {**env, **state["env"]}
            worker_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
            started("worker", _deploy_and_work(Path(project), worker_env, logs))
    except BaseException:
        down(dir_)
        raise
    return state


WORK_POOL = "tidal-pool"  # the pool prefect.yaml's deployments name


def _deploy_and_work(project: Path, env: dict[str, str], logs: Path) -> subprocess.Popen:
    """The work pool, prefect.yaml's deployments (from `project`) and a worker on the pool."""
    if not (project / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {project}: pass the project folder (--project)")
    pool = subprocess.run([_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process",
                           "--overwrite"], env=env, cwd=project, capture_output=True, text=True)
    deploy = subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=project,
                            capture_output=True, text=True)
    for step, done in (("work-pool create", pool), ("deploy --all", deploy)):
        if done.returncode != 0:
            raise StackError(f"`prefect {step}` failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
    return _start([_bin("prefect"), "worker", "start", "--pool", WORK_POOL], env, logs / "worker.log")


def status(dir_: str | Path = ".stack") -> dict[str, Any]:
    """Which parts of the stack run (by process id and by answering their health check)."""
    state = read_state(dir_)
    if state is None:
        return {"running": False, "parts": {}}
    parts = {name: _alive(pid) for name, pid in state["pids"].items()}
    return {"running": all(parts.values()), "parts": parts, "env": state["env"], "dir": state["dir"]}


def _stop(pids: list[int], timeout_s: float) -> None:
    """SIGTERM to each process's session, SIGKILL to those still alive after timeout_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _alive(pid):
                try:
                    os.killpg(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


def down(dir_: str | Path = ".stack", timeout_s: float = 30) -> bool:
    """Stop the servers (SIGTERM to their sessions, SIGKILL after timeout_s) and PostgreSQL;
    return False when dir_ holds no running stack."""
    dir_ = Path(dir_).resolve()
    state = read_state(dir_)
    if state is None:
        return False
    servers = [pid for name, pid in state["pids"].items() if name != "postgres"]  # the worker too
    _stop(servers, timeout_s)
    if "postgres" in state["pids"]:
        _stop([state["pids"]["postgres"]], timeout_s)  # after its clients: a clean shutdown
    (dir_ / STATE_FILE).unlink(missing_ok=True)
    return True
