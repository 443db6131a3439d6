"""Issue #31, item 1, against the real thing: `tidal labelstudio listen` started as users start it,
emitting to a real Prefect API (the test harness). Forged and unsigned requests are refused,
oversized and malformed bodies answered with a 4xx while valid deliveries keep being answered, a
slow connection is cut after the timeout, a burst of 100 deliveries for one experiment is one
event (one labels-arrived run, so one cycle), and a delivery made while Prefect's API is down is
kept and delivered once it is back."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.servers import background, free_port, http_json, wait_until
from tidal.labeling import labelstudio

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    runs = tmp_path / "runs"
    for exp in ("exp-a", "exp-burst", "exp-down"):
        (runs / exp).mkdir(parents=True)
        (runs / exp / "labelstudio.json").write_text('{"url": "", "project_id": 1}')
    secret = labelstudio.webhook_secret({"runs_dir": str(runs)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_API_URL": PREFECT_API_URL.value(), "DO_NOT_TRACK": "1"})
    return {"runs": runs, "secret": secret, "env": env, "api": PREFECT_API_URL.value(), "tmp": tmp_path}


@contextmanager
def listening(setup: dict, api_url: str | None = None, name: str = "listener"):
    port = free_port()
    env = {**setup["env"], "PREFECT_API_URL": api_url or setup["api"]}
    cmd = [str(BIN / "tidal"), "labelstudio", "listen", "--port", str(port), "--set", f"runs_dir={setup['runs']}"]
    with background(cmd, setup["tmp"] / f"{name}.log", env, cwd=setup["tmp"]):
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 60, "listener")
        yield port


def deliver(port: int, experiment: str, secret: str | None, body: bytes | None = None,
            content_type: str = "application/json") -> int:
    data = body if body is not None else json.dumps(
        {"action": "ANNOTATION_CREATED", "task": {"id": 1, "data": {"experiment": experiment}}}).encode()
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers[labelstudio.SECRET_HEADER] = secret
    req = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def events_for(api: str, experiment: str) -> list[dict]:
    found = http_json(f"{api}/events/filter", "POST", {"filter": {
        "event": {"name": ["tidal.labels.arrived"]}, "resource": {"id": [f"tidal.experiment.{experiment}"]}},
        "limit": 50})
    return found["events"]


def test_the_listener_refuses_what_is_not_label_studio_and_keeps_serving(setup):
    secret, tmp = setup["secret"], setup["tmp"]
    with listening(setup) as port:
        assert deliver(port, "exp-a", None) == 401
        assert deliver(port, "exp-a", "f" * 64) == 403
        assert deliver(port, "exp-a", None, content_type="text/plain") == 401  # a browser's form post
        big = b'{"action": "ANNOTATION_CREATED", "pad": "' + b"x" * (2 << 20) + b'"}'
        assert deliver(port, "exp-a", secret, body=big) == 413
        assert deliver(port, "exp-a", secret) == 202
        for bad in (b"[]", b"1", b"{not json"):
            assert deliver(port, "exp-a", secret, body=bad) == 400
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /webhook HTTP/1.1\r\nContent-Type: application/json\r\n"
                         + f"{labelstudio.SECRET_HEADER}: {secret}\r\nContent-Length: abc\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.0 400")
        assert deliver(port, "exp-a", secret) == 202

        # A connection that sends its request slowly is cut after the timeout (10 s), while valid
        # deliveries are still answered meanwhile.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        slow.sendall(b"POST /webhook HTTP/1.1\r\n")
        assert deliver(port, "exp-a", secret) == 202
        while True:
            try:
                slow.sendall(b"X")
            except OSError:
                break
            slow.settimeout(1.0)
            try:
                if slow.recv(100) == b"" or time.monotonic() - started > 30:
                    break
            except TimeoutError:
                pass
        held = time.monotonic() - started
        slow.close()
        assert 9 <= held <= 14, held

        # 100 deliveries for one experiment at once: one event.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: deliver(port, "exp-burst", secret), range(100)))
        assert answers == [202] * 100
        wait_until(lambda: events_for(setup["api"], "exp-burst"), 30, "the burst's event")
        time.sleep(3)  # room for any second event to show up
        assert len(events_for(setup["api"], "exp-burst")) == 1
        assert len(events_for(setup["api"], "exp-a")) >= 1
    assert "Traceback" not in (tmp / "listener.log").read_text()


def test_a_delivery_made_while_prefect_is_down_is_delivered_when_it_is_back(setup):
    dead = f"http://127.0.0.1:{free_port()}/api"
    with listening(setup, api_url=dead, name="listener-down") as port:
        assert deliver(port, "exp-down", setup["secret"]) == 202
        spool = setup["runs"] / ".listener-spool"
        wait_until(lambda: "could not emit the event for exp-down" in (setup["tmp"] / "listener-down.log").read_text(),
                   60, "a failed emission")
    assert len(list(spool.glob("*.json"))) == 1  # kept, not logged as arrived and lost
    assert events_for(setup["api"], "exp-down") == []
    with listening(setup, name="listener-up"):
        wait_until(lambda: events_for(setup["api"], "exp-down"), 60, "the kept event")
        wait_until(lambda: not list(spool.iterdir()), 10, "an empty spool")
    assert len(events_for(setup["api"], "exp-down")) == 1


def test_labels_arrived_runs_one_flow_at_a_time_queuing_the_rest(monkeypatch):
    """prefect.yaml's labels-arrived deployment, as `prefect deploy` and `tidal serve` read it."""
    import yaml

    from flows.serve import deployments_from_prefect_yaml

    monkeypatch.chdir(REPO)
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert declared["labels-arrived"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    served = {d.name: d for d in deployments_from_prefect_yaml("prefect.yaml")}["labels-arrived"]
    assert served.concurrency_limit == 1 and served.concurrency_options.collision_strategy.value == "ENQUEUE"
