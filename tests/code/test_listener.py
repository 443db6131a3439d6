"""The webhook receiver answers Label Studio at once and spools one event per experiment (a burst
of deliveries is one event); the inbox spools one event per new labels file; the sender hands the
spool to Prefect (here a recording stand-in) and keeps what it could not hand over."""
from __future__ import annotations

import json
import urllib.request

import pytest

from flows.listener import SECRET_HEADER, Limits, Listener

SECRET = "s3cret-" * 8


@pytest.fixture
def listener(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    for exp in ("exp-a", "exp-b"):
        (tmp_path / "runs" / exp).mkdir(parents=True)
        (tmp_path / "runs" / exp / "labelstudio.json").write_text('{"project_id": 1}')
    emitted: list[tuple[str, dict]] = []
    server = Listener("127.0.0.1", 0, tmp_path / "secret", tmp_path / "spool", inbox=tmp_path / "inbox",
                      runs_dir=tmp_path / "runs", limits=Limits(settle_s=0.0),
                      emit=lambda exp, payload: emitted.append((exp, payload)))
    server.emitted = emitted
    yield server
    server.stopping.set()
    server.server.server_close()


def post(port: int, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", SECRET_HEADER: SECRET})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_webhooks_and_inbox_files_become_events(listener, tmp_path):
    import threading

    port = listener.server.server_address[1]
    threading.Thread(target=listener.server.serve_forever, daemon=True).start()
    try:
        task = {"id": 7, "data": {"experiment": "exp-a", "sample_id": "s1"}}
        assert post(port, {"action": "ANNOTATION_CREATED", "task": task}) == (202, {"ok": True, "queued": "exp-a"})
        assert post(port, {"action": "PROJECT_UPDATED", "task": task})[0] == 200       # not an annotation: ignored
        assert post(port, {"action": "ANNOTATION_CREATED", "task": {"id": 8, "data": {}}})[0] == 200  # not tidal's
        assert post(port, {"action": "ANNOTATION_UPDATED", "task": {**task, "id": 9}})[0] == 202  # same experiment
    finally:
        listener.server.shutdown()
    assert listener.deliver_spool() == (1, False)  # two deliveries for exp-a: one event
    assert listener.emitted == [("exp-a", {"source": "label-studio", "action": "ANNOTATION_UPDATED", "task": 9})]
    assert listener.deliver_spool() == (0, False) and not list((tmp_path / "spool").iterdir())

    (tmp_path / "inbox/exp-b").mkdir(parents=True)
    (tmp_path / "inbox/exp-b/back.csv").write_text("id,label\ns1,3\n")
    (tmp_path / "inbox/exp-b/more.jsonl").write_text('{"id": "s2", "label": "4"}\n')
    (tmp_path / "inbox/exp-b/notes.txt").write_text("not labels")
    assert listener.scan_inbox() == 2
    assert listener.scan_inbox() == 0  # the same file is one event, not one per scan
    assert listener.deliver_spool() == (2, False)  # one event per file: the flow imports the file it names
    assert sorted(p["file"] for _, p in listener.emitted[1:]) == sorted(
        str((tmp_path / "inbox/exp-b" / name).resolve()) for name in ("back.csv", "more.jsonl"))


def test_an_event_prefect_did_not_take_stays_spooled_and_is_sent_later(listener, tmp_path):
    """Prefect's API down: the delivery is not lost (today it was logged as arrived and dropped)."""
    calls = []

    def flaky(exp: str, payload: dict) -> None:
        calls.append(exp)
        if len(calls) <= 2:
            raise ConnectionError("Prefect is down")

    listener.emit = flaky
    listener.spool_event("exp-a", {"source": "label-studio"})
    assert listener.deliver_spool() == (0, True)
    assert listener.deliver_spool() == (0, True)
    assert [p.suffix for p in (tmp_path / "spool").iterdir()] == [".json"]  # kept, not half-sent
    assert listener.deliver_spool() == (1, False)
    assert calls == ["exp-a"] * 3 and not list((tmp_path / "spool").iterdir())

    # A listener killed while sending leaves `.sending`: the next one sends it.
    path = listener.spool_event("exp-a", {"source": "label-studio"})
    path.rename(path.with_suffix(".sending"))
    again = Listener("127.0.0.1", 0, tmp_path / "secret", tmp_path / "spool", limits=Limits(settle_s=0.0),
                     emit=lambda exp, payload: calls.append(exp))
    try:
        assert again.deliver_spool() == (1, False) and calls[-1] == "exp-a"
    finally:
        again.server.server_close()
