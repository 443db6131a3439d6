"""Start and stop real servers (Prefect, MLflow, a Prefect worker) on 127.0.0.1 for tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, method: str = "GET", body: dict | None = None, timeout: float = 10) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # a server still starting refuses connections
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last_error})")


@contextmanager
def background(cmd: list[str], log: Path, env: dict, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run cmd in its own process group; stop the whole group on exit, even after a failure."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # children (MLflow's job consumers, a worker's flow runs) may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


LABEL_STUDIO_VENV = Path(__file__).resolve().parents[2] / ".venv-labelstudio"  # `make test` installs it


@contextmanager
def label_studio(data_dir: Path, document_root: Path, token: str, port: int | None = None) -> Iterator[dict]:
    """A real Label Studio (its own virtualenv, see the Makefile) on 127.0.0.1, serving local files
    under `document_root`, with an admin whose legacy API token is `token`; yields url, token,
    port, log and the process."""
    exe = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if not exe.is_file():
        raise RuntimeError(f"{exe} is missing: `make test` installs Label Studio into {LABEL_STUDIO_VENV} "
                           "(the Makefile's labelstudio target)")
    port = port or free_port()
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": "tidal-test-pw",
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
           "SSRF_PROTECTION_ENABLED": "false"}  # webhooks to 127.0.0.1 are refused otherwise
    url = f"http://127.0.0.1:{port}"
    log = data_dir.parent / f"label-studio-{port}.log"
    with background([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                     "--data-dir", str(data_dir)], log, env) as proc:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited ({proc.returncode}); see {log}")
            return http_json(f"{url}/health", timeout=5).get("status") == "UP"
        wait_until(up, 300, f"Label Studio on {url}", interval=1)
        yield {"url": url, "token": token, "port": port, "log": log, "proc": proc}
