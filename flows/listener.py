"""`tidal labelstudio listen`: Label Studio's webhook and a labels inbox, turned into Prefect events.

Label Studio waits about a second for a webhook's answer, so the receiver answers at once and
hands the event to a sender thread. Each ANNOTATION_CREATED/UPDATED (or a labels file dropped in
`<inbox>/<experiment>/`) becomes one `tidal.labels.arrived` event for the experiment; the
`labels-arrived` deployment of prefect.yaml has a trigger on it that runs
`flows.experiment.labels_arrived`. Duplicate deliveries are harmless: that flow and the state
decide whether a cycle runs. Open-source Prefect has events and triggers but no webhooks (a
Cloud feature), hence this receiver.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prefect.events import emit_event

from flows.experiment import LABELS_ARRIVED

log = logging.getLogger("tidal.listener")
ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"}
INBOX_SUFFIXES = {".csv", ".jsonl", ".json"}


def emit_labels_arrived(experiment: str, payload: dict[str, Any]) -> None:
    """One event; its payload always has `file` ("" for Label Studio), which the trigger passes on
    (a missing key would be an undefined Jinja value, which the trigger's action cannot send)."""
    payload = {"file": "", **payload}
    emit_event(event=LABELS_ARRIVED, resource={"prefect.resource.id": f"tidal.experiment.{experiment}",
                                               "tidal.experiment": experiment},
               payload={"experiment": experiment, **payload})


def experiment_of(body: dict[str, Any]) -> str | None:
    """The experiment a Label Studio webhook is about: the task data tidal pushed names it."""
    task = body.get("task") or {}
    data = task.get("data") if isinstance(task, dict) else None
    return data.get("experiment") if isinstance(data, dict) else None


class Listener:
    """The webhook receiver (POST /webhook) and the inbox watcher, feeding one sender thread."""

    def __init__(self, host: str, port: int, inbox: Path | None = None, poll_s: float = 2.0) -> None:
        self.events: queue.Queue[tuple[str, dict] | None] = queue.Queue()
        self.inbox, self.poll_s = inbox, poll_s
        self.seen: set[Path] = set()
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    log.warning("webhook body is not JSON; ignored")
                    return
                experiment = experiment_of(body)
                if body.get("action") in ACTIONS and experiment:
                    events.put((experiment, {"source": "label-studio", "action": body["action"],
                                             "task": (body.get("task") or {}).get("id")}))

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug(fmt, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)

    def _send(self) -> None:
        while (item := self.events.get()) is not None:
            experiment, payload = item
            try:
                emit_labels_arrived(experiment, payload)
                log.info("labels arrived for %s (%s)", experiment, payload)
            except Exception as err:  # the server may be restarting: the next delivery retries
                log.error("could not emit the event for %s: %s", experiment, err)

    def scan_inbox(self) -> int:
        """Queue one event per labels file new in `<inbox>/<experiment>/`; returns how many."""
        found = 0
        for path in sorted(self.inbox.glob("*/*")) if self.inbox else []:
            if path.suffix.lower() in INBOX_SUFFIXES and path not in self.seen and path.is_file():
                self.seen.add(path)
                self.events.put((path.parent.name, {"source": "inbox", "file": str(path.resolve())}))
                found += 1
        return found

    def _watch(self) -> None:
        while True:
            self.scan_inbox()
            time.sleep(self.poll_s)

    def serve_forever(self) -> None:
        threading.Thread(target=self._send, daemon=True).start()
        if self.inbox is not None:
            self.inbox.mkdir(parents=True, exist_ok=True)
            threading.Thread(target=self._watch, daemon=True).start()
        self.server.serve_forever()
