"""The webhook receiver answers Label Studio at once and queues one event per annotation of a
tidal task; the inbox queues one event per new labels file (Prefect is not called here)."""
from __future__ import annotations

import json
import threading
import urllib.request

from flows.listener import Listener


def _post(port: int, body: object) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def test_webhooks_and_inbox_files_become_events(tmp_path):
    listener = Listener("127.0.0.1", 0, inbox=tmp_path / "inbox")
    port = listener.server.server_address[1]
    threading.Thread(target=listener.server.serve_forever, daemon=True).start()
    try:
        task = {"id": 7, "data": {"experiment": "exp-a", "sample_id": "s1"}}
        assert json.loads(_post(port, {"action": "ANNOTATION_CREATED", "task": task})) == {"ok": True}
        _post(port, {"action": "PROJECT_UPDATED", "task": task})          # not an annotation: ignored
        _post(port, {"action": "ANNOTATION_CREATED", "task": {"id": 8, "data": {}}})  # not a tidal task
        assert listener.events.get(timeout=5) == ("exp-a", {"source": "label-studio",
                                                             "action": "ANNOTATION_CREATED", "task": 7})
        assert listener.events.empty()
    finally:
        listener.server.shutdown()

    (tmp_path / "inbox/exp-b").mkdir(parents=True)
    (tmp_path / "inbox/exp-b/back.csv").write_text("id,label\ns1,3\n")
    (tmp_path / "inbox/exp-b/notes.txt").write_text("not labels")
    assert listener.scan_inbox() == 1
    assert listener.scan_inbox() == 0  # the same file is one event, not one per scan
    experiment, payload = listener.events.get_nowait()
    assert experiment == "exp-b" and payload["file"] == str((tmp_path / "inbox/exp-b/back.csv").resolve())
