"""`tidal labelstudio listen`: Label Studio's webhook and a labels inbox, turned into Prefect events.

Only Label Studio may make this machine start work, and no request may tie the receiver up:

- One path (POST /webhook), signed: the request carries the shared secret that `tidal labelstudio
  connect` wrote (`<runs_dir>/labelstudio_webhook.secret`, mode 0600) and registered as a custom
  header of each project's webhook; it is compared in constant time. A browser cannot send that
  header without a CORS preflight, which this server never grants.
- A JSON object of at most `Limits.max_body` bytes with a valid Content-Length; anything else is a
  4xx before the body is read, never a traceback or a 200.
- Each connection has `Limits.request_timeout_s` for its whole request (a watchdog cuts slower
  ones) and at most `Limits.max_handlers` are served at once (the rest get 503 at once).
- The experiment must be one tidal pushed to Label Studio (`<runs_dir>/<experiment>/labelstudio.json`).

Label Studio waits about a second for the answer, so the receiver only spools the delivery (one
file per experiment, or per experiment and inbox file, under `<runs_dir>/.listener-spool/`) and
answers 202; a sender thread emits one `tidal.labels.arrived` event per spool entry once no new
delivery has come for `Limits.settle_s`, and removes the entry only after Prefect's API took the
event. Prefect down: the entry stays and is retried every `Limits.retry_s`, across restarts too.
A burst of deliveries for one experiment is therefore one event, and the `labels-arrived`
deployment (concurrency limit 1, queued) runs one flow at a time; the flow and the state decide
whether a cycle runs. Open-source Prefect has events and triggers but no webhooks (a Cloud
feature), hence this receiver.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from flows.experiment import LABELS_ARRIVED
from tidal.config import NAME_PATTERN
from tidal.labeling.labelstudio import CONNECTION_FILE, SECRET_HEADER, read_webhook_secret
from tidal.workspace import atomic_write_text

log = logging.getLogger("tidal.listener")
ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"}
INBOX_SUFFIXES = {".csv", ".jsonl", ".json"}
WEBHOOK_PATH = "/webhook"
SPOOL_DIR = ".listener-spool"  # in runs_dir


@dataclass(frozen=True)
class Limits:
    max_body: int = 1 << 20          # bytes; Label Studio's annotation payloads are a few kB
    request_timeout_s: float = 10.0  # a whole request (headers and body); slower connections are cut
    max_handlers: int = 16           # requests served at once; more get 503
    settle_s: float = 1.0            # deliveries for one experiment closer than this are one event
    max_wait_s: float = 10.0         # ... but a steady stream still emits at least this often
    retry_s: float = 5.0             # Prefect unreachable: try the spool again after this


class Refused(Exception):
    """A request answered with a 4xx: its status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def emit_labels_arrived(experiment: str, payload: dict[str, Any]) -> None:
    """Post one event to Prefect's API, raising when the API does not take it (prefect's
    `emit_event` sends in the background and drops what it cannot send). The payload always has
    `file` ("" for Label Studio), which the trigger passes on (a missing key would be an undefined
    Jinja value, which the trigger's action cannot send)."""
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    event = Event(event=LABELS_ARRIVED, resource={"prefect.resource.id": f"tidal.experiment.{experiment}",
                                                  "tidal.experiment": experiment},
                  payload={"experiment": experiment, "file": "", **payload})
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/events", json=[event.model_dump(mode="json")])
        response.raise_for_status()


def experiment_of(body: dict[str, Any]) -> str | None:
    """The experiment a Label Studio webhook is about: the task data tidal pushed names it."""
    task = body.get("task") or {}
    data = task.get("data") if isinstance(task, dict) else None
    name = data.get("experiment") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def valid_experiment_name(name: str) -> bool:
    """The name rule of config.validate (NAME_PATTERN): nothing that could leave runs_dir."""
    return NAME_PATTERN.fullmatch(name) is not None


class _Deadlines:
    """One watchdog for every connection: a socket still open after its deadline is shut down for
    reading, which ends any read its handler is blocked in (a per-read timeout alone lets a client
    that sends a byte every few seconds hold its handler forever); the handler may still write its
    short answer, each write bounded by the socket's timeout."""

    def __init__(self) -> None:
        self.open: dict[socket.socket, float] = {}
        self.lock = threading.Lock()

    def add(self, sock: socket.socket, timeout_s: float) -> None:
        with self.lock:
            self.open[sock] = time.monotonic() + timeout_s

    def remove(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.pop(sock, None)

    def cut_expired(self) -> int:
        now = time.monotonic()
        with self.lock:
            expired = [s for s, deadline in self.open.items() if deadline <= now]
            for sock in expired:
                del self.open[sock]
        for sock in expired:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by its handler
                pass
        return len(expired)


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_handlers` handler threads; a connection beyond that is
    answered 503 by the accepting thread and closed, never queued behind slow ones."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog is 5: a burst of deliveries beyond it waits for TCP's SYN
    # retries (1 s, then 3 s) before it is even accepted, let alone answered.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: Limits) -> None:
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.max_handlers)
        self.deadlines = _Deadlines()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.deadlines.add(request, self.limits.request_timeout_s)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.deadlines.remove(request)
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.remove(request)
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection cut by the watchdog or reset by its client: not worth a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class Listener:
    """The webhook receiver (POST /webhook) and the inbox watcher, spooling events that one sender
    thread delivers to Prefect."""

    def __init__(self, host: str, port: int, secret_file: Path, spool: Path, inbox: Path | None = None,
                 runs_dir: Path | None = None, limits: Limits = Limits(),
                 emit: Callable[[str, dict[str, Any]], None] = emit_labels_arrived, poll_s: float = 2.0) -> None:
        self.secret_file, self.spool, self.inbox, self.runs_dir = secret_file, spool, inbox, runs_dir
        self.limits, self.emit, self.poll_s = limits, emit, poll_s
        self.seen: set[Path] = set()
        self.first_seen: dict[str, float] = {}  # spool entry -> when the sender first saw it
        self.stopping = threading.Event()
        # The sender runs with the creator's context: Prefect's settings (PREFECT_API_URL, a test
        # harness's temporary settings) live in context variables, which new threads do not inherit.
        self.context = contextvars.copy_context()
        self.spool.mkdir(parents=True, exist_ok=True)
        for sending in self.spool.glob("*.sending"):  # a sender killed while sending: not delivered yet
            os.replace(sending, sending.with_suffix(".json"))
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = limits.request_timeout_s  # each read and write; the watchdog bounds the whole request

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                refused = False
                try:
                    body = listener.read_delivery(self.path, self.headers, self.rfile)
                    status, answer = listener.accept(body)
                except Refused as err:
                    log.warning("refused a request from %s: %d %s", self.client_address[0], err.status, err.reason)
                    status, answer = err.status, {"ok": False, "error": err.reason}
                    refused = True
                except OSError as err:  # the spool cannot be written: Label Studio should not think it arrived
                    log.error("could not spool a delivery: %s", err)
                    status, answer = 503, {"ok": False, "error": "cannot keep the delivery now"}
                raw = json.dumps(answer).encode()
                self.close_connection = True
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(raw)
                if refused:
                    self.drain()

            def drain(self, seconds: float = 2.0) -> None:
                """Drop what the client still sends (a refused body, never read) for a moment before
                closing: a socket closed with unread data sends a reset, and a client still writing
                its body (urllib, Label Studio's requests) then never reads the answer."""
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(0.5)
                    deadline = time.monotonic() + seconds
                    while time.monotonic() < deadline and self.connection.recv(1 << 16):
                        pass
                except OSError:
                    pass

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug(fmt, *args)

        self.server = _BoundedServer((host, port), Handler, limits)

    # The receiving side: every check before the body is read, then the spool.

    def read_delivery(self, path: str, headers: Any, rfile: Any) -> dict[str, Any]:
        """The JSON object of a signed delivery to the webhook path; Refused otherwise."""
        if path.split("?", 1)[0] != WEBHOOK_PATH:
            raise Refused(404, f"no such path; Label Studio's webhook is {WEBHOOK_PATH}")
        secret = read_webhook_secret(self.secret_file)
        if secret is None:
            raise Refused(401, "this listener has no webhook secret yet: run `tidal labelstudio connect`")
        given = headers.get(SECRET_HEADER)
        if given is None:
            raise Refused(401, f"missing {SECRET_HEADER}")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode()):
            raise Refused(403, f"wrong {SECRET_HEADER}")
        if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise Refused(415, "the body must be application/json")
        if headers.get("Transfer-Encoding") is not None:
            raise Refused(411, "a Content-Length is required (no chunked bodies)")
        declared = headers.get_all("Content-Length") or []
        if not declared:
            raise Refused(411, "a Content-Length is required")
        if len(set(declared)) != 1 or not declared[0].strip().isdigit():
            raise Refused(400, "bad Content-Length")
        length = int(declared[0])
        if length > self.limits.max_body:
            raise Refused(413, f"the body is over {self.limits.max_body} bytes")
        try:
            raw = rfile.read(length)
        except TimeoutError:
            raw = b""
        if len(raw) != length:  # cut by the watchdog, timed out, or closed early
            raise Refused(408, "the body did not arrive whole within the time limit")
        try:
            body = json.loads(raw)
        except ValueError:
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    def accept(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Spool the event a delivery stands for; the answer (status, body) for Label Studio."""
        experiment = experiment_of(body)
        if body.get("action") not in ACTIONS or experiment is None:
            return 200, {"ok": True, "ignored": "not an annotation of a task tidal pushed"}
        if not valid_experiment_name(experiment):
            raise Refused(400, "not an experiment name")
        if self.runs_dir is not None and not (self.runs_dir / experiment / CONNECTION_FILE).is_file():
            raise Refused(404, "no experiment of that name has a Label Studio project here")
        task = body.get("task") or {}
        self.spool_event(experiment, {"source": "label-studio", "action": body["action"], "task": task.get("id")})
        return 202, {"ok": True, "queued": experiment}

    def spool_event(self, experiment: str, payload: dict[str, Any]) -> Path:
        """Keep the event on disk until Prefect takes it. Deliveries for one experiment share one
        entry (the flow reads the labels from Label Studio, not from the event); an inbox file has
        its own, since the flow imports the file the event names."""
        key = hashlib.sha256(f"{experiment}\0{payload.get('file', '')}".encode()).hexdigest()[:32]
        path = self.spool / f"{key}.json"
        atomic_write_text(path, json.dumps({"experiment": experiment, "payload": payload}))
        return path

    # The sending side.

    def deliver_spool(self) -> tuple[int, bool]:
        """Emit each spool entry that has settled, removing it once Prefect took it; (emitted, failed).
        On a failure the entry goes back and the rest wait for the next try."""
        now, sent = time.monotonic(), 0
        for path in sorted(self.spool.glob("*.json")):
            try:
                quiet_s = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            first = self.first_seen.setdefault(path.name, now)
            if quiet_s < self.limits.settle_s and now - first < self.limits.max_wait_s:
                continue
            sending = path.with_suffix(".sending")
            try:
                os.replace(path, sending)  # a delivery from now on writes a new entry: a later event
            except FileNotFoundError:
                continue
            self.first_seen.pop(path.name, None)
            try:
                entry = json.loads(sending.read_text())
            except ValueError:
                log.error("spool entry %s is not JSON; dropped", sending)
                sending.unlink(missing_ok=True)
                continue
            try:
                self.emit(entry["experiment"], entry["payload"])
            except Exception as err:
                # Back in the spool (a newer delivery to the same entry is the same event).
                os.replace(sending, path)
                log.error("could not emit the event for %s (%s); kept in %s, retrying in %.0f s",
                          entry["experiment"], err, self.spool, self.limits.retry_s)
                return sent, True
            sending.unlink(missing_ok=True)
            sent += 1
            log.info("labels arrived for %s (%s)", entry["experiment"], entry["payload"])
        return sent, False

    def _send(self) -> None:
        while not self.stopping.is_set():
            try:
                _, failed = self.deliver_spool()
            except OSError as err:
                log.error("could not read the spool %s: %s", self.spool, err)
                failed = True
            self.stopping.wait(self.limits.retry_s if failed else min(0.25, self.limits.settle_s))

    def _watchdog(self) -> None:
        while not self.stopping.wait(0.2):
            self.server.deadlines.cut_expired()

    def scan_inbox(self) -> int:
        """Spool one event per labels file new in `<inbox>/<experiment>/`; returns how many."""
        found = 0
        for path in sorted(self.inbox.glob("*/*")) if self.inbox else []:
            if path.suffix.lower() in INBOX_SUFFIXES and path not in self.seen and path.is_file():
                self.seen.add(path)
                self.spool_event(path.parent.name, {"source": "inbox", "file": str(path.resolve())})
                found += 1
        return found

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                self.scan_inbox()
            except OSError as err:
                log.error("could not scan the inbox %s: %s", self.inbox, err)
            self.stopping.wait(self.poll_s)

    def start(self) -> None:
        """The sender, the watchdog, the inbox watcher and the server, each in a daemon thread."""
        threading.Thread(target=self.context.run, args=(self._send,), daemon=True, name="listener-send").start()
        threading.Thread(target=self._watchdog, daemon=True, name="listener-watchdog").start()
        if self.inbox is not None:
            self.inbox.mkdir(parents=True, exist_ok=True)
            threading.Thread(target=self._watch, daemon=True, name="listener-inbox").start()
        threading.Thread(target=self.server.serve_forever, daemon=True, name="listener-http").start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.wait(3600):
                pass
        finally:
            self.stop()
