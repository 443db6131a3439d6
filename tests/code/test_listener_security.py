"""Issue #31, item 1: the webhook receiver serves only signed JSON objects of bounded size on its
one path, cuts slow connections and serves a bounded number at once. Each request is sent raw, as
an attacker (a local process, or a browser's `text/plain` form post) would send it."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from flows.listener import SECRET_HEADER, Limits, Listener
from tidal.labeling import labelstudio

SECRET = "ab" * 32


@pytest.fixture
def listener(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "runs/exp-a").mkdir(parents=True)
    (tmp_path / "runs/exp-a/labelstudio.json").write_text('{"project_id": 1}')
    emitted: list[tuple[str, dict]] = []
    server = Listener("127.0.0.1", 0, tmp_path / "secret", tmp_path / "spool", runs_dir=tmp_path / "runs",
                      limits=Limits(request_timeout_s=2.0, max_handlers=4, settle_s=0.0, retry_s=0.2),
                      emit=lambda exp, payload: emitted.append((exp, payload)))
    server.emitted = emitted
    server.start()
    yield server
    server.stop()


def raw(port: int, head: str, body: bytes = b"", timeout: float = 5) -> int:
    """Send bytes as they are; the status the server answered (0: closed without an answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # answered before the whole body was read: fine if answered
            pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def request(body: bytes, secret: str | None = SECRET, path: str = "/webhook", content_type: str = "application/json",
            length: str | None = "auto", method: str = "POST", extra: str = "") -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if secret is not None:
        lines.append(f"{SECRET_HEADER}: {secret}")
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == 'auto' else length}")
    return "\n".join(lines) + "\n" + extra


VALID = json.dumps({"action": "ANNOTATION_CREATED", "task": {"id": 1, "data": {"experiment": "exp-a"}}}).encode()


def valid(port: int) -> int:
    return raw(port, request(VALID), VALID)


def test_forged_unsigned_and_malformed_requests_are_refused_and_valid_ones_still_served(listener):
    port = listener.server.server_address[1]
    other = json.dumps({"action": "ANNOTATION_CREATED", "task": {"data": {"experiment": "not-mine"}}}).encode()
    climb = json.dumps({"action": "ANNOTATION_CREATED", "task": {"data": {"experiment": ".."}}}).encode()
    cases = {
        "unsigned": (raw(port, request(VALID, secret=None), VALID), 401),
        "forged": (raw(port, request(VALID, secret="ab" * 31 + "ac"), VALID), 403),
        "forged, another length": (raw(port, request(VALID, secret="x"), VALID), 403),
        "browser form post": (raw(port, request(VALID, secret=None, content_type="text/plain"), VALID), 401),
        "signed text/plain": (raw(port, request(VALID, content_type="text/plain"), VALID), 415),
        "another path": (raw(port, request(VALID, path="/anything"), VALID), 404),
        "GET": (raw(port, request(b"", method="GET", length=None)), 501),
        "no length": (raw(port, request(VALID, length=None), VALID), 411),
        "chunked": (raw(port, request(b"", length=None, extra="Transfer-Encoding: chunked\n"),
                        b"%x\r\n%s\r\n0\r\n\r\n" % (len(VALID), VALID)), 411),
        "length abc": (raw(port, request(VALID, length="abc"), VALID), 400),
        "length -1": (raw(port, request(VALID, length="-1"), VALID), 400),
        "two lengths": (raw(port, request(VALID, extra=f"Content-Length: {len(VALID) + 1}\n"), VALID), 400),
        "over 1 MB": (raw(port, request(b"", length=str(300 * 2**20))), 413),
        "over 1 MB, sent": (raw(port, request(b"x" * (2**20 + 1)), b"x" * (2**20 + 1)), 413),
        "not JSON": (raw(port, request(b"{oops"), b"{oops"), 400),
        "JSON []": (raw(port, request(b"[]"), b"[]"), 400),
        "JSON 1": (raw(port, request(b"1"), b"1"), 400),
        "body shorter than its length": (raw(port, request(b"{}", length="10"), b"{}", timeout=5), 408),
        "unknown experiment": (raw(port, request(other), other), 404),
        "experiment '..'": (raw(port, request(climb), climb), 400),
    }
    assert {name: got for name, (got, _) in cases.items()} == {name: want for name, (_, want) in cases.items()}
    assert valid(port) == 202  # the receiver still serves Label Studio
    deadline = time.monotonic() + 10
    while not listener.emitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [exp for exp, _ in listener.emitted] == ["exp-a"]  # no refused request made an event


def test_no_secret_written_yet_means_every_webhook_is_refused(listener, tmp_path):
    (tmp_path / "secret").unlink()
    assert valid(listener.server.server_address[1]) == 401


def test_slow_connections_are_cut_and_handlers_are_bounded(listener):
    port = listener.server.server_address[1]
    threads_before = threading.active_count()
    # Slowloris: a byte of the header every 0.3 s keeps each read alive; the whole request gets 2 s.
    drip = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    drip.sendall(b"POST /webhook HTTP/1.1\r\n")
    cut = None
    for byte in b"X-Slow: " + b"a" * 40:
        try:
            drip.sendall(bytes([byte]))
            time.sleep(0.3)
            drip.setblocking(False)
            if drip.recv(1024) == b"":
                cut = time.monotonic() - started
                break
        except BlockingIOError:
            pass
        except OSError:
            cut = time.monotonic() - started
            break
        finally:
            drip.setblocking(True)
    drip.close()
    assert cut is not None and cut < 5.0, cut

    # 30 connections that never finish their request: at most 4 handlers; the rest answered 503 at once.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    # Polled, not slept: on a busy machine the server takes its time to accept the 30.
    assert _answers_within(port, 503, seconds=1.5)  # before the watchdog frees a handler (2 s)
    assert threading.active_count() - threads_before <= 4
    assert _answers_within(port, 202, seconds=10)  # the watchdog cut the 4 held ones
    for sock in idle:
        sock.close()


def _answers_within(port: int, status: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if valid(port) == status:
            return True
        time.sleep(0.05)
    return False


def test_connect_writes_a_0600_secret_and_keeps_it(tmp_path, monkeypatch):
    params = {"runs_dir": str(tmp_path / "runs")}
    first = labelstudio.webhook_secret(params)
    path = labelstudio.secret_path(params)
    assert len(first) == 64 and os.stat(path).st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    assert labelstudio.webhook_secret(params) == first  # registered webhooks stay valid
    assert os.stat(path).st_mode & 0o777 == 0o600
